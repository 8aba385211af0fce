//! Table and property tests of the matching functions.

use super::*;
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

fn amount(cores: u64, gib: u64, gpus: u32, vram_gib: u64) -> Amount {
    Amount { cpu_millis: cores * 1000, memory_bytes: gib * GIB, gpus, vram_bytes: vram_gib * GIB }
}

fn cores(cores: u64) -> Amount {
    amount(cores, 0, 0, 0)
}

fn request(demand: Amount, class: Class, reputation: f64, waited_min: u64) -> Pending {
    Pending { demand, class, reputation, waited: Duration::from_secs(waited_min * 60) }
}

fn other(demand: Amount) -> Pending {
    request(demand, Class::Other, 0.5, 0)
}

fn total(pending: &[Pending], chosen: &[usize]) -> Amount {
    chosen.iter().fold(Amount::ZERO, |sum, &i| sum.saturating_add(&pending[i].demand))
}

#[test]
fn fits_in_needs_every_resource() {
    let machine = amount(8, 32, 1, 12);
    assert!(amount(8, 32, 1, 12).fits_in(&machine));
    assert!(Amount::ZERO.fits_in(&machine));
    assert!(!amount(9, 1, 0, 0).fits_in(&machine));
    assert!(!amount(1, 33, 0, 0).fits_in(&machine));
    assert!(!amount(1, 1, 2, 1).fits_in(&machine));
    assert!(!amount(1, 1, 1, 13).fits_in(&machine));
}

#[test]
fn arithmetic() {
    let a = amount(4, 8, 1, 8);
    let b = amount(6, 2, 0, 4);
    assert_eq!(a.saturating_sub(&b), amount(0, 6, 1, 4));
    assert_eq!(a.checked_add(&b), Some(amount(10, 10, 1, 12)));
    let full = Amount { cpu_millis: u64::MAX, ..Amount::ZERO };
    assert_eq!(full.checked_add(&a), None);
    assert_eq!(full.saturating_add(&a).cpu_millis, u64::MAX);
    assert!(Amount::ZERO.is_zero());
    assert!(!amount(0, 0, 0, 1).is_zero());
}

#[test]
fn default_weights() {
    let weights = Weights::default();
    assert_eq!(weights.reputation, 0.5);
    assert_eq!(weights.aging, Duration::from_secs(600));
    assert_eq!(weights.starve_after, Duration::from_secs(1800));
}

#[test]
fn utilisation_is_the_mean_over_what_is_idle() {
    let idle = amount(8, 16, 0, 0);
    assert_eq!(utilisation(&idle, &amount(4, 16, 0, 0)), 0.75);
    // Over-use counts as full; resources with nothing idle do not count.
    assert_eq!(utilisation(&idle, &amount(16, 0, 1, 8)), 0.5);
    assert_eq!(utilisation(&amount(4, 8, 1, 8), &amount(1, 2, 1, 8)), (0.25 + 0.25 + 1.0 + 1.0) / 4.0);
    assert_eq!(utilisation(&Amount::ZERO, &amount(1, 1, 1, 1)), 0.0);
}

#[test]
fn fills_better_than_first_come_first_served() {
    let pending = [other(cores(5)), other(cores(4)), other(cores(4)), other(cores(1))];
    let idle = cores(8);
    assert_eq!(first_come_first_served(&idle, &pending), vec![0]);
    let mut chosen = choose(&idle, &pending, &Weights::default());
    chosen.sort_unstable();
    assert_eq!(chosen, vec![1, 2]);
}

#[test]
fn family_first() {
    // The other request would fill the machine, has the better reputation and has waited
    // longer (but is not starving); the family one still goes first.
    let pending = [
        request(cores(4), Class::Other, 1.0, 20),
        request(cores(2), Class::Family, 0.0, 0),
        request(cores(2), Class::Other, 0.0, 0),
    ];
    let chosen = choose(&cores(4), &pending, &Weights::default());
    assert_eq!(chosen, vec![1, 2]);
}

#[test]
fn starving_requests_first_oldest_first() {
    let pending = [
        request(cores(2), Class::Family, 1.0, 0),
        request(cores(1), Class::Other, 0.0, 31),
        request(cores(1), Class::Other, 0.0, 45),
    ];
    let chosen = choose(&cores(4), &pending, &Weights::default());
    assert_eq!(chosen, vec![2, 1, 0]);
}

#[test]
fn capacity_is_held_for_a_starving_request_that_does_not_fit() {
    let pending = [
        request(cores(1), Class::Other, 0.0, 50),
        request(cores(6), Class::Other, 0.0, 40),
        request(cores(1), Class::Other, 0.0, 35),
        request(cores(1), Class::Family, 1.0, 0),
    ];
    // 4 cores idle: the 50-minute one starts, the 40-minute one waits for 6, and nothing
    // younger takes the room it needs.
    assert_eq!(choose(&cores(4), &pending, &Weights::default()), vec![0]);
    // Once enough is idle, it starts and the rest follows.
    assert_eq!(choose(&cores(9), &pending, &Weights::default()), vec![0, 1, 2, 3]);
}

#[test]
fn too_big_or_zero_demand_never_chosen() {
    let pending = [
        other(cores(16)),
        other(Amount::ZERO),
        other(amount(1, 1, 1, 4)),
        request(Amount::ZERO, Class::Other, 0.0, 60),
        other(cores(1)),
    ];
    // No GPU idle, 8 cores: only the last fits. The starving zero request holds nothing.
    assert_eq!(choose(&amount(8, 16, 0, 0), &pending, &Weights::default()), vec![4]);
}

#[test]
fn reputation_and_waiting_break_ties() {
    let weights = Weights::default();
    let pending = [request(cores(2), Class::Other, 0.2, 0), request(cores(2), Class::Other, 0.9, 0)];
    assert_eq!(choose(&cores(2), &pending, &weights), vec![1]);
    let pending = [request(cores(2), Class::Other, 0.5, 1), request(cores(2), Class::Other, 0.5, 9)];
    assert_eq!(choose(&cores(2), &pending, &weights), vec![1]);
    // But not against a clearly better fill: 3 of 4 cores beats 2 of 4 however old.
    let pending = [request(cores(2), Class::Other, 1.0, 29), request(cores(3), Class::Other, 0.0, 0)];
    assert_eq!(choose(&cores(4), &pending, &weights), vec![1]);
}

fn candidate(free: Amount, price_per_hour: u64, reputation: f64, window_covers: bool) -> Candidate {
    Candidate { free, price_per_hour, reputation, window_covers }
}

#[test]
fn rank_orders_by_window_fit_reputation_price_index() {
    let demand = amount(2, 4, 0, 0);
    let candidates = [
        candidate(amount(1, 64, 0, 0), 1, 1.0, true),   // 0: too few cores
        candidate(amount(16, 64, 0, 0), 10, 0.5, true), // 1: covers, loose fit
        candidate(amount(4, 8, 0, 0), 10, 0.5, false),  // 2: tight fit, window too short
        candidate(amount(4, 8, 0, 0), 10, 0.5, true),   // 3: covers, tight fit
        candidate(amount(4, 8, 0, 0), 10, 0.9, true),   // 4: same fit, better reputation
        candidate(amount(4, 8, 0, 0), 5, 0.5, true),    // 5: same fit and reputation, cheaper
        candidate(amount(4, 8, 0, 0), 10, 0.5, true),   // 6: same as 3, later
        candidate(amount(2, 4, 0, 0), 99, 0.5, true),   // 7: exact fit, above a ceiling of 10
    ];
    assert_eq!(rank(&demand, None, &candidates), vec![7, 4, 5, 3, 6, 1, 2]);
    assert_eq!(rank(&demand, Some(10), &candidates), vec![4, 5, 3, 6, 1, 2]);
    assert_eq!(rank(&demand, Some(4), &candidates), Vec::<usize>::new());
    // A GPU job only goes where there is a GPU.
    let gpu = candidate(amount(8, 32, 1, 16), 50, 0.1, false);
    assert_eq!(rank(&amount(1, 1, 1, 8), None, &[candidates[1], gpu]), vec![1]);
}

fn arb_amount(max_cores: u64, max_gib: u64, max_gpus: u32) -> impl Strategy<Value = Amount> {
    (0..=max_cores * 2, 0..=max_gib, 0..=max_gpus, 0..=max_gpus as u64 * 8).prop_map(
        |(half, gib, gpus, vram)| Amount {
            cpu_millis: half * 500,
            memory_bytes: gib * GIB,
            gpus,
            vram_bytes: vram * GIB,
        },
    )
}

fn arb_pending(starving: bool) -> impl Strategy<Value = Pending> {
    let max_waited: u64 = if starving { 60 } else { 29 };
    (arb_amount(6, 24, 1), prop::bool::ANY, 0.0..=1.0f64, 0..=max_waited).prop_map(
        |(demand, family, reputation, waited)| {
            let class = if family { Class::Family } else { Class::Other };
            request(demand, class, reputation, waited)
        },
    )
}

fn plain(pending: Vec<Pending>) -> Vec<Pending> {
    pending.into_iter().map(|p| Pending { class: Class::Other, waited: Duration::ZERO, ..p }).collect()
}

proptest! {
    #[test]
    fn chosen_are_unique_in_range_and_fit(
        idle in arb_amount(16, 64, 2),
        pending in prop::collection::vec(arb_pending(true), 0..40),
    ) {
        let chosen = choose(&idle, &pending, &Weights::default());
        let mut seen = vec![false; pending.len()];
        for &i in &chosen {
            prop_assert!(i < pending.len());
            prop_assert!(!seen[i], "{i} chosen twice");
            seen[i] = true;
            prop_assert!(!pending[i].demand.is_zero());
        }
        prop_assert!(total(&pending, &chosen).fits_in(&idle));
    }

    #[test]
    fn never_fills_less_than_first_come_first_served(
        idle in arb_amount(16, 64, 2),
        pending in prop::collection::vec(arb_pending(false), 0..40),
    ) {
        let pending = plain(pending);
        let ours = utilisation(&idle, &total(&pending, &choose(&idle, &pending, &Weights::default())));
        let fifo = utilisation(&idle, &total(&pending, &first_come_first_served(&idle, &pending)));
        prop_assert!(ours >= fifo, "choose {ours} < FCFS {fifo}");
    }

    #[test]
    fn chosen_set_is_maximal_without_starving_requests(
        idle in arb_amount(16, 64, 2),
        pending in prop::collection::vec(arb_pending(false), 0..40),
    ) {
        let chosen = choose(&idle, &pending, &Weights::default());
        let left = idle.saturating_sub(&total(&pending, &chosen));
        for (i, p) in pending.iter().enumerate() {
            if !chosen.contains(&i) && !p.demand.is_zero() {
                prop_assert!(!p.demand.fits_in(&left), "{i} left out but fits");
            }
        }
    }

    #[test]
    fn family_requests_are_chosen_before_others(
        idle in arb_amount(16, 64, 2),
        pending in prop::collection::vec(arb_pending(false), 0..40),
    ) {
        let chosen = choose(&idle, &pending, &Weights::default());
        let first_other = chosen.iter().position(|&i| pending[i].class == Class::Other);
        let last_family = chosen.iter().rposition(|&i| pending[i].class == Class::Family);
        if let (Some(o), Some(f)) = (first_other, last_family) {
            prop_assert!(f < o);
        }
        // The family set alone is maximal on the whole idle capacity.
        let family: Vec<usize> = chosen.iter().copied().filter(|&i| pending[i].class == Class::Family).collect();
        let left = idle.saturating_sub(&total(&pending, &family));
        for (i, p) in pending.iter().enumerate() {
            if p.class == Class::Family && !chosen.contains(&i) && !p.demand.is_zero() {
                prop_assert!(!p.demand.fits_in(&left));
            }
        }
    }

    #[test]
    fn rank_returns_fitting_affordable_candidates_in_order(
        demand in arb_amount(4, 16, 1),
        ceiling in prop::option::of(0..100u64),
        candidates in prop::collection::vec(
            (arb_amount(8, 32, 1), 0..100u64, (0..=4u8).prop_map(|r| f64::from(r) / 4.0), prop::bool::ANY)
                .prop_map(|(free, price, reputation, covers)| candidate(free, price, reputation, covers)),
            0..30,
        ),
    ) {
        let ranked = rank(&demand, ceiling, &candidates);
        for (i, c) in candidates.iter().enumerate() {
            let eligible = demand.fits_in(&c.free) && ceiling.is_none_or(|m| c.price_per_hour <= m);
            prop_assert_eq!(ranked.contains(&i), eligible, "candidate {}", i);
        }
        for pair in ranked.windows(2) {
            let (a, b) = (&candidates[pair[0]], &candidates[pair[1]]);
            prop_assert!(a.window_covers >= b.window_covers);
            if a.window_covers != b.window_covers {
                continue;
            }
            let (fa, fb) = (utilisation(&a.free, &demand), utilisation(&b.free, &demand));
            prop_assert!(fa >= fb - 1e-9);
            if fa != fb {
                continue;
            }
            prop_assert!(a.reputation >= b.reputation);
            if a.reputation != b.reputation {
                continue;
            }
            prop_assert!(a.price_per_hour <= b.price_per_hour);
            if a.price_per_hour == b.price_per_hour {
                prop_assert!(pair[0] < pair[1]);
            }
        }
    }
}
