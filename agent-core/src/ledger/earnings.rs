//! Earnings: credits computed from countersigned receipts, what this agent earned as a provider
//! and spent as a consumer, by period (UTC days, ISO weeks or months of the job's end), by
//! resource kind and by peer. A pure function over receipts; no clock, no I/O.

use std::collections::BTreeMap;

pub use hearth_api::ledger::{Earnings, Period, PeriodEarnings, Totals};

use super::record::ReceiptBody;

/// Adds `receipt`, whose other side is `peer`, to `totals`.
fn add(totals: &mut Totals, receipt: &ReceiptBody, peer: &str) {
    totals.amount = totals.amount.saturating_add(receipt.amount);
    totals.receipts += 1;
    let kinds = &mut totals.by_kind;
    kinds.cpu = kinds.cpu.saturating_add(receipt.charges.cpu);
    kinds.memory = kinds.memory.saturating_add(receipt.charges.memory);
    kinds.gpu = kinds.gpu.saturating_add(receipt.charges.gpu);
    let by_peer = totals.by_peer.entry(peer.to_owned().into()).or_default();
    *by_peer = by_peer.saturating_add(receipt.amount);
}

/// Sums `receipts` from `owner`'s point of view. Receipts `owner` is no party to are left out.
pub fn summarize(owner: &str, receipts: &[ReceiptBody], by: Option<Period>) -> Earnings {
    let mut periods: BTreeMap<String, PeriodEarnings> = BTreeMap::new();
    let mut total = PeriodEarnings { period: "all".into(), ..PeriodEarnings::default() };
    for receipt in receipts {
        let name = by.map_or_else(|| "all".to_owned(), |by| period_of(receipt.ended_at, by));
        let entry = periods
            .entry(name.clone())
            .or_insert_with(|| PeriodEarnings { period: name, ..PeriodEarnings::default() });
        if receipt.provider == owner {
            add(&mut entry.earned, receipt, &receipt.consumer);
            add(&mut total.earned, receipt, &receipt.consumer);
        } else if receipt.consumer == owner {
            add(&mut entry.spent, receipt, &receipt.provider);
            add(&mut total.spent, receipt, &receipt.provider);
        }
    }
    Earnings { owner: owner.to_owned().into(), periods: periods.into_values().collect(), total, broken: None }
}

/// The name of the period holding `at` (Unix seconds, UTC).
pub fn period_of(at: i64, by: Period) -> String {
    let Ok(time) = jiff::Timestamp::from_second(at) else { return "out of range".into() };
    let date = time.to_zoned(jiff::tz::TimeZone::UTC).date();
    match by {
        Period::Day => date.to_string(),
        Period::Week => {
            let week = date.iso_week_date();
            format!("{:04}-W{:02}", week.year(), week.week())
        }
        Period::Month => format!("{:04}-{:02}", date.year(), date.month()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::record::{Charges, Usage, VERSION};
    use crate::net::advert::Prices;

    fn receipt(provider: &str, consumer: &str, ended_at: i64, charges: Charges) -> ReceiptBody {
        ReceiptBody {
            version: VERSION,
            agreement_id: format!("{provider}{consumer}{ended_at}").into(),
            agreement_hash: "00".repeat(32),
            provider: provider.into(),
            consumer: consumer.into(),
            outcome: "finished".into(),
            exit_code: Some(0),
            result: None,
            usage: Usage::default(),
            prices: Prices { core_hour: 1000, memory_gib_hour: 100, gpu_hour: 10_000 },
            price_per_hour: 1100,
            charges,
            amount: charges.total(),
            started_at: ended_at - 60,
            ended_at,
        }
    }

    #[test]
    fn earnings_split_by_side_kind_peer_and_period() {
        // 2026-12-05 (Saturday, ISO week 49), 2026-12-07 (Monday, week 50), 2027-01-01.
        let (sat, mon, new_year) = (1_796_472_000, 1_796_644_800, 1_798_761_600);
        let receipts = vec![
            receipt("me", "alice", sat, Charges { cpu: 1000, memory: 50, gpu: 0 }),
            receipt("me", "bob", mon, Charges { cpu: 10, memory: 1, gpu: 0 }),
            receipt("carol", "me", mon, Charges { cpu: 500, memory: 0, gpu: 2000 }),
            receipt("me", "alice", new_year, Charges { cpu: 1, memory: 1, gpu: 1 }),
            receipt("dave", "erin", sat, Charges { cpu: 7, memory: 0, gpu: 0 }),
        ];
        let all = summarize("me", &receipts, None);
        assert_eq!(all.periods.len(), 1);
        assert_eq!(all.total.earned.amount, 1050 + 11 + 3);
        assert_eq!(all.total.earned.receipts, 3);
        assert_eq!(all.total.earned.by_kind, Charges { cpu: 1011, memory: 52, gpu: 1 });
        assert_eq!(all.total.earned.by_peer["alice"], 1053);
        assert_eq!(all.total.earned.by_peer["bob"], 11);
        assert_eq!(all.total.spent.amount, 2500);
        assert_eq!(all.total.spent.by_peer["carol"], 2500);
        assert_eq!(all.total.spent.by_kind.gpu, 2000);

        let weeks = summarize("me", &receipts, Some(Period::Week));
        let names: Vec<&str> = weeks.periods.iter().map(|p| p.period.as_str()).collect();
        assert_eq!(names, ["2026-W49", "2026-W50", "2026-W53"]);
        assert_eq!(weeks.periods[1].earned.amount, 11);
        assert_eq!(weeks.periods[1].spent.amount, 2500);

        let months = summarize("me", &receipts, Some(Period::Month));
        let names: Vec<&str> = months.periods.iter().map(|p| p.period.as_str()).collect();
        assert_eq!(names, ["2026-12", "2027-01"]);
        assert_eq!(months.total, all.total);

        assert_eq!(period_of(sat, Period::Day), "2026-12-05");
    }
}
