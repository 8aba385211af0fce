//! Benchmark B6, matching: how fully and how fast a provider chooses which pending requests to
//! start on its idle capacity (`hearth::market::matching::choose`), beside the exact optimum and
//! a first-come-first-served queue.
//!
//! `bench-b6 [INSTANCES] [RUNS]` (defaults 1000 and 200). Traces come from a fixed-seed
//! generator, so every run sees the same ones: idle capacity like a home machine (4-32 cores of
//! which half to all are idle, 8-128 GiB of which 40-100% is free, no GPU or one or two of
//! 8-24 GiB each) and requests from a mix of half small CPU jobs (0.5-4 cores, 0.5-8 GiB), a
//! quarter memory-heavy jobs (1-8 cores, 8-64 GiB) and a quarter GPU jobs (2-8 cores, 8-32 GiB,
//! one GPU or now and then two, 4-24 GiB of GPU memory each), with reputations and waits (under
//! the 30-minute starvation limit) drawn at random.
//!
//! Quality. INSTANCES instances of 8-16 pending requests of one class: the exact optimum
//! utilisation, by exhaustive search over every subset that fits, beside `choose` and
//! `first_come_first_served`; once with the default weights (reputation and waiting tip
//! near-equal fills, which may cost up to 2%) and once with neutral ones (utilisation alone). At
//! scale, 200 instances of 10,000 pending requests, where no search can find the optimum, against
//! an upper bound on it: the dual of the linear relaxation.
//!
//! Speed. RUNS times, a fresh trace of 10,000 pending requests (a fifth of them family) against
//! one idle capacity, timed on one thread: `choose`, and as anchors on the same input
//! `first_come_first_served` and one unstable sort of the 10,000 requests by size, the least that
//! any largest-first greedy does. Prints the median and the 99th percentile.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use hearth::market::matching::{
    Amount, Class, Pending, Weights, choose, first_come_first_served, utilisation,
};
use hearth_tests::percentile_ms;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Pending requests in the timed and the at-scale instances.
const LARGE: usize = 10_000;
/// Instances at scale, each bounded by a search over resource prices.
const AT_SCALE: usize = 200;

/// splitmix64: a tiny generator with a fixed seed, so traces are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    /// Uniform in 0..1.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.next() as usize % from.len()]
    }
}

/// Idle capacity of a home machine, part of it busy with the owner's own work.
fn idle(rng: &mut Rng) -> Amount {
    let cores = rng.pick(&[4u64, 6, 8, 12, 16, 24, 32]);
    let gib = rng.pick(&[8u64, 16, 32, 64, 128]);
    let gpus = rng.pick(&[0u32, 0, 0, 1, 1, 2]);
    let vram_each = rng.pick(&[8u64, 12, 16, 24]);
    Amount {
        // Half to all of the cores, in quarter cores; 40% to all of the memory, in 256 MiB.
        cpu_millis: rng.range(cores * 2, cores * 4) * 250,
        memory_bytes: rng.range(gib * 4 * 2 / 5, gib * 4) * 256 * MIB,
        gpus,
        vram_bytes: u64::from(gpus) * vram_each * GIB,
    }
}

/// A request from the mix: half small CPU jobs, a quarter memory-heavy, a quarter GPU jobs.
fn demand(rng: &mut Rng) -> Amount {
    let (quarter_cores, half_gib, gpus, vram_gib) = match rng.range(0, 3) {
        0 | 1 => (rng.range(2, 16), rng.range(1, 16), 0, 0),
        2 => (rng.range(4, 32), rng.range(16, 128), 0, 0),
        _ => {
            let gpus = if rng.range(0, 5) == 0 { 2 } else { 1 };
            (rng.range(8, 32), rng.range(16, 64), gpus, rng.range(4, 24) * u64::from(gpus))
        }
    };
    Amount {
        cpu_millis: quarter_cores * 250,
        memory_bytes: half_gib * 512 * MIB,
        gpus,
        vram_bytes: vram_gib * GIB,
    }
}

fn pending(rng: &mut Rng, count: usize, family_share: f64) -> Vec<Pending> {
    (0..count)
        .map(|_| Pending {
            demand: demand(rng),
            class: if rng.unit() < family_share { Class::Family } else { Class::Other },
            reputation: rng.unit(),
            // Under the 30-minute starvation limit of the default weights.
            waited: Duration::from_secs(rng.range(0, 29 * 60)),
        })
        .collect()
}

fn used(pending: &[Pending], chosen: &[usize]) -> Amount {
    chosen.iter().fold(Amount::ZERO, |sum, &i| sum.saturating_add(&pending[i].demand))
}

/// The best utilisation of `idle` by any subset of `pending` that fits, by exhaustive search.
fn optimum(idle: &Amount, pending: &[Pending]) -> f64 {
    fn search(idle: &Amount, pending: &[Pending], at: usize, sum: Amount, best: &mut f64) {
        let Some(request) = pending.get(at) else {
            *best = best.max(utilisation(idle, &sum));
            return;
        };
        let with = sum.saturating_add(&request.demand);
        if with.fits_in(idle) {
            search(idle, pending, at + 1, with, best);
        }
        search(idle, pending, at + 1, sum, best);
    }
    let mut best = 0.0;
    search(idle, pending, 0, Amount::ZERO, &mut best);
    best
}

/// An upper bound on the best utilisation of `idle` by any subset of `pending`: the dual of the
/// linear relaxation. For any prices y >= 0 on the resources, sum_d y_d + sum_i max(0, s_i -
/// sum_d y_d a_id) is at least the optimum, where a_id is request i's share of resource d and s_i
/// its share of the utilisation. y is improved by a pattern search over single resources and
/// pairs traded against each other; wherever it stops, the bound holds.
fn upper_bound(idle: &Amount, pending: &[Pending]) -> f64 {
    let vector =
        |a: &Amount| [a.cpu_millis as f64, a.memory_bytes as f64, f64::from(a.gpus), a.vram_bytes as f64];
    let capacity = vector(idle);
    let dims: Vec<usize> = (0..4).filter(|&d| capacity[d] > 0.0).collect();
    let k = dims.len();
    if k == 0 {
        return 0.0;
    }
    // Only requests that fit alone can be in a fill.
    let rows: Vec<([f64; 4], f64)> = pending
        .iter()
        .filter(|p| !p.demand.is_zero() && p.demand.fits_in(idle))
        .map(|p| {
            let need = vector(&p.demand);
            let a: [f64; 4] = std::array::from_fn(|j| dims.get(j).map_or(0.0, |&d| need[d] / capacity[d]));
            (a, a.iter().sum::<f64>() / k as f64)
        })
        .collect();
    let bound = |y: &[f64; 4]| {
        let dot = |a: &[f64; 4]| a.iter().zip(y).map(|(a, y)| a * y).sum::<f64>();
        y.iter().sum::<f64>() + rows.iter().map(|(a, s)| (s - dot(a)).max(0.0)).sum::<f64>()
    };
    let mut directions: Vec<[f64; 4]> = Vec::new();
    for d in 0..k {
        for e in d..k {
            let mut direction = [0.0; 4];
            direction[d] = 1.0;
            if e != d {
                direction[e] = -1.0;
            }
            directions.push(direction);
            directions.push(direction.map(|x| -x));
        }
    }
    let mut y: [f64; 4] = std::array::from_fn(|j| if j < k { 1.0 / k as f64 } else { 0.0 });
    let mut best = bound(&y);
    let mut step = 0.25 / k as f64;
    while step > 1e-5 {
        let mut moved = false;
        for direction in &directions {
            let trial: [f64; 4] = std::array::from_fn(|j| (y[j] + step * direction[j]).max(0.0));
            let value = bound(&trial);
            if value < best - 1e-12 {
                (y, best, moved) = (trial, value, true);
            }
        }
        if !moved {
            step /= 2.0;
        }
    }
    best.min(1.0)
}

/// How `choose` and first come, first served did on a set of small instances.
struct Quality {
    optimum: f64,
    ours: f64,
    fifo: f64,
    to_optimum: f64,
    to_optimum_worst: f64,
    within_95: usize,
    to_fifo: f64,
    below_fifo: usize,
}

fn quality(instances: &[(Amount, Vec<Pending>)], weights: &Weights) -> Quality {
    let mut q = Quality {
        optimum: 0.0,
        ours: 0.0,
        fifo: 0.0,
        to_optimum: 0.0,
        to_optimum_worst: f64::INFINITY,
        within_95: 0,
        to_fifo: 0.0,
        below_fifo: 0,
    };
    let mut fifo_nonzero = 0;
    for (idle, pending) in instances {
        let best = optimum(idle, pending);
        let ours = utilisation(idle, &used(pending, &choose(idle, pending, weights)));
        let fifo = utilisation(idle, &used(pending, &first_come_first_served(idle, pending)));
        // Where nothing fits at all, every answer is optimal.
        let ratio = if best > 0.0 { ours / best } else { 1.0 };
        q.optimum += best;
        q.ours += ours;
        q.fifo += fifo;
        q.to_optimum += ratio;
        q.to_optimum_worst = q.to_optimum_worst.min(ratio);
        q.within_95 += usize::from(ratio >= 0.95);
        if fifo > 0.0 {
            q.to_fifo += ours / fifo;
            fifo_nonzero += 1;
        }
        q.below_fifo += usize::from(ours < fifo);
    }
    let n = instances.len() as f64;
    (q.optimum, q.ours, q.fifo, q.to_optimum) = (q.optimum / n, q.ours / n, q.fifo / n, q.to_optimum / n);
    q.to_fifo /= f64::from(fifo_nonzero.max(1));
    q
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    let runs: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(200);
    ensure!(count > 0 && runs > 0, "at least one instance and one run");
    let started = Instant::now();
    let mut rng = Rng(0x4845_4152_5448_0006);
    let weights = Weights::default();

    // Quality on small instances, against the exact optimum.
    let small: Vec<(Amount, Vec<Pending>)> = (0..count)
        .map(|_| {
            let idle = idle(&mut rng);
            let n = rng.range(8, 16) as usize;
            (idle, pending(&mut rng, n, 0.0))
        })
        .collect();
    let neutral_small: Vec<(Amount, Vec<Pending>)> = small
        .iter()
        .map(|(idle, p)| {
            (*idle, p.iter().map(|r| Pending { reputation: 0.0, waited: Duration::ZERO, ..*r }).collect())
        })
        .collect();
    let neutral = Weights { reputation: 0.0, ..weights };
    let small_rows = [
        ("default weights, random reputation and waits", quality(&small, &weights)),
        ("neutral weights (utilisation alone)", quality(&neutral_small, &neutral)),
    ];
    println!("B6 matching, quality: {count} instances of 8-16 pending requests, one class, none starving");
    println!(
        "{:<46} {:>8} {:>7} {:>6} {:>11} {:>11} {:>10} {:>10} {:>9}",
        "mean utilisation, then ratios",
        "optimum",
        "choose",
        "FCFS",
        "choose/opt",
        "worst",
        ">= 0.95",
        "ch/FCFS",
        "ch < FCFS"
    );
    for (name, q) in &small_rows {
        println!(
            "{name:<46} {:>8.3} {:>7.3} {:>6.3} {:>11.4} {:>11.3} {:>10} {:>10.2} {:>9}",
            q.optimum,
            q.ours,
            q.fifo,
            q.to_optimum,
            q.to_optimum_worst,
            format!("{}/{count}", q.within_95),
            q.to_fifo,
            q.below_fifo
        );
    }

    // Quality at scale, against an upper bound.
    let (mut ours, mut fifo, mut bound, mut ratio, mut worst) = (0.0, 0.0, 0.0, 0.0, f64::INFINITY);
    for _ in 0..AT_SCALE {
        let idle = idle(&mut rng);
        let pending = pending(&mut rng, LARGE, 0.0);
        let u = utilisation(&idle, &used(&pending, &choose(&idle, &pending, &weights)));
        let b = upper_bound(&idle, &pending);
        ours += u;
        fifo += utilisation(&idle, &used(&pending, &first_come_first_served(&idle, &pending)));
        bound += b;
        let r = if b > 0.0 { u / b } else { 1.0 };
        ratio += r;
        worst = worst.min(r);
    }
    let n = AT_SCALE as f64;
    println!();
    println!("B6 matching, quality at scale: {AT_SCALE} instances of {LARGE} pending requests, one class");
    println!(
        "{:<46} {:>8} {:>7} {:>6} {:>11} {:>11}",
        "mean utilisation, then ratios", "bound", "choose", "FCFS", "choose/bnd", "worst"
    );
    println!(
        "{:<46} {:>8.3} {:>7.3} {:>6.3} {:>11.4} {:>11.3}",
        "upper bound: dual of the linear relaxation",
        bound / n,
        ours / n,
        fifo / n,
        ratio / n,
        worst
    );

    // Decision time.
    let (mut ours_time, mut fifo_time, mut sort_time) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ours_util, mut fifo_util) = (0.0, 0.0);
    for _ in 0..runs {
        let idle = idle(&mut rng);
        let pending = pending(&mut rng, LARGE, 0.2);
        let start = Instant::now();
        let chosen = black_box(choose(black_box(&idle), black_box(&pending), &weights));
        ours_time.push(start.elapsed());
        let start = Instant::now();
        let fifo = black_box(first_come_first_served(black_box(&idle), black_box(&pending)));
        fifo_time.push(start.elapsed());
        let start = Instant::now();
        let mut keys: Vec<(u64, usize)> = black_box(&pending)
            .iter()
            .enumerate()
            .map(|(i, p)| (p.demand.cpu_millis.saturating_add(p.demand.memory_bytes >> 20), i))
            .collect();
        keys.sort_unstable();
        black_box(keys);
        sort_time.push(start.elapsed());
        ours_util += utilisation(&idle, &used(&pending, &chosen));
        fifo_util += utilisation(&idle, &used(&pending, &fifo));
    }
    println!();
    println!(
        "B6 matching, decision time: {LARGE} pending requests (a fifth family), {runs} runs, one thread"
    );
    println!("{:<46} {:>8} {:>8} {:>12}", "", "p50 [ms]", "p99 [ms]", "utilisation");
    let rows = [
        ("choose", &ours_time, Some(ours_util)),
        ("first_come_first_served (anchor)", &fifo_time, Some(fifo_util)),
        ("one sort of the 10,000 by size (anchor)", &sort_time, None),
    ];
    for (name, times, util) in rows {
        let util = util.map_or_else(|| "-".to_owned(), |u| format!("{:.3}", u / runs as f64));
        println!(
            "{name:<46} {:>8.3} {:>8.3} {util:>12}",
            percentile_ms(times, 50.0),
            percentile_ms(times, 99.0)
        );
    }

    let (default, plain) = (&small_rows[0].1, &small_rows[1].1);
    let (p50, p99) = (percentile_ms(&ours_time, 50.0), percentile_ms(&ours_time, 99.0));
    println!();
    println!(
        "choose/optimum: mean {:.4}, worst {:.3} with the default weights; mean {:.4}, worst {:.3} neutral \
         (target >= 0.95)",
        default.to_optimum, default.to_optimum_worst, plain.to_optimum, plain.to_optimum_worst
    );
    println!(
        "choose below FCFS: {} and {} of {count} instances (target 0); at scale choose/bound {:.3}",
        default.below_fifo,
        plain.below_fifo,
        ratio / n
    );
    println!(
        "choose over {LARGE} pending: p50 {p50:.3} ms, p99 {p99:.3} ms (target <= 10 ms), {:.1}x one sort of them",
        p50 / percentile_ms(&sort_time, 50.0)
    );
    println!("whole run: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
