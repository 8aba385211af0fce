//! Matching, as pure functions over values: which pending requests a provider starts when idle
//! capacity appears ([`choose`]), and which providers a consumer asks first ([`rank`]). No
//! network, no clock, no store: the waiting times are passed in.
//!
//! [`choose`] is a multi-dimensional knapsack (cores, memory, GPUs, GPU memory) under two hard
//! rules, starvation first and family first. It is solved approximately, within a bounded amount
//! of work, by balanced greedy fills and a local search over swaps; benchmark B6
//! (`scripts/bench-market`) measures it against the exact optimum and against
//! [`first_come_first_served`].

use std::time::Duration;

/// An amount of the four resources matching weighs: cores, memory, GPUs and GPU memory. Used both
/// for what a request needs and for what a provider has idle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Amount {
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Whole GPUs.
    pub gpus: u32,
    /// GPU memory in bytes, summed over the GPUs.
    pub vram_bytes: u64,
}

/// Whose request it is. Family comes first; the family-sharing work supplies the class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// A member of the owner's family or group.
    Family,
    /// Anyone else.
    Other,
}

/// A request waiting at a provider.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pending {
    /// What it needs.
    pub demand: Amount,
    /// Whose it is.
    pub class: Class,
    /// The consumer's reputation, from 0 (bad) to 1 (good).
    pub reputation: f64,
    /// How long it has waited.
    pub waited: Duration,
}

/// How [`choose`] weighs what is not fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// How much reputation raises a request's weight.
    pub reputation: f64,
    /// Waiting this long doubles a request's weight.
    pub aging: Duration,
    /// A request that has waited this long is served before any other, and capacity is held for
    /// it until it fits, so nothing starves.
    pub starve_after: Duration,
}

/// A provider as a consumer sees it in its advert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// What it has free.
    pub free: Amount,
    /// What it would charge for the demand, in thousandths of a credit per hour.
    pub price_per_hour: u64,
    /// Its reputation, from 0 (bad) to 1 (good).
    pub reputation: f64,
    /// Whether its sharing window lasts at least as long as the job may run.
    pub window_covers: bool,
}

/// The four resources of an [`Amount`] side by side, in its field order.
type Vector = [u64; 4];

impl Amount {
    /// Nothing of anything.
    pub const ZERO: Amount = Amount { cpu_millis: 0, memory_bytes: 0, gpus: 0, vram_bytes: 0 };

    /// Whether this amount fits in `other`: no more of any of the four resources.
    pub fn fits_in(&self, other: &Amount) -> bool {
        fits(&self.vector(), &other.vector())
    }

    /// What is left of this amount once `other` is taken out, each resource floored at zero.
    pub fn saturating_sub(&self, other: &Amount) -> Amount {
        Amount {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            gpus: self.gpus.saturating_sub(other.gpus),
            vram_bytes: self.vram_bytes.saturating_sub(other.vram_bytes),
        }
    }

    /// Both amounts together, or `None` if any resource would overflow.
    pub fn checked_add(&self, other: &Amount) -> Option<Amount> {
        Some(Amount {
            cpu_millis: self.cpu_millis.checked_add(other.cpu_millis)?,
            memory_bytes: self.memory_bytes.checked_add(other.memory_bytes)?,
            gpus: self.gpus.checked_add(other.gpus)?,
            vram_bytes: self.vram_bytes.checked_add(other.vram_bytes)?,
        })
    }

    /// Both amounts together, each resource capped at the largest value it can hold.
    pub fn saturating_add(&self, other: &Amount) -> Amount {
        Amount {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            gpus: self.gpus.saturating_add(other.gpus),
            vram_bytes: self.vram_bytes.saturating_add(other.vram_bytes),
        }
    }

    /// Whether this is nothing of anything.
    pub fn is_zero(&self) -> bool {
        *self == Amount::ZERO
    }

    fn vector(&self) -> Vector {
        [self.cpu_millis, self.memory_bytes, u64::from(self.gpus), self.vram_bytes]
    }
}

impl Default for Weights {
    /// Full reputation raises a request's weight by half; waiting 10 minutes doubles it; after 30
    /// minutes a request is served before any other.
    fn default() -> Self {
        Weights {
            reputation: 0.5,
            aging: Duration::from_secs(10 * 60),
            starve_after: Duration::from_secs(30 * 60),
        }
    }
}

/// How fully `used` fills `idle`: the mean, over the resources `idle` has any of, of the share of
/// it that `used` takes (each share capped at 1); 0 when `idle` is nothing. [`choose`] maximises
/// it and benchmark B6 reports it.
pub fn utilisation(idle: &Amount, used: &Amount) -> f64 {
    let mut sum = 0.0;
    let mut dimensions = 0u32;
    for (have, take) in idle.vector().into_iter().zip(used.vector()) {
        if have > 0 {
            sum += (take as f64 / have as f64).min(1.0);
            dimensions += 1;
        }
    }
    if dimensions == 0 { 0.0 } else { sum / f64::from(dimensions) }
}

/// How much weight may buy in utilisation: the search maximises each request's share of the idle
/// capacity raised by up to this fraction for the heaviest (most reputable, longest waiting), so
/// weight decides between fills within about 2% of each other and costs at most that much.
const NEAR_TIE: f64 = 0.02;
/// Balanced greedy passes: each keeps the spare shares of the essential resources within this
/// much of each other while it takes requests (the last is unconstrained).
const BANDS: [f64; 4] = [0.05, 0.15, 0.3, f64::INFINITY];
/// A resource is essential when at least this share of the requests need some of it (cores and
/// memory, typically; GPUs are not).
const ESSENTIAL: f64 = 0.9;
/// How many requests the local search considers swapping in: the most valuable, with at most
/// [`POOL_SAME`] of any one demand, looked for among the first [`POOL_SCAN`]. Chosen ones are
/// skipped when swapping.
const POOL: usize = 96;
const POOL_SAME: usize = 3;
const POOL_SCAN: usize = 4096;
/// How many of the chosen requests, the least valuable first, are paired for 2-for-n swaps.
const OUT_PAIRS_AMONG: usize = 48;
/// How many of the pool, the most valuable first, are grouped in pairs for n-for-2 swaps...
const IN_PAIRS_AMONG: usize = 64;
/// ...and in threes for n-for-3 swaps.
const IN_TRIPLES_AMONG: usize = 20;
/// Local-search rounds; each makes the best improving swap it finds.
const ROUNDS: usize = 12;
/// Swap candidates checked per round, so the time to choose is bounded whatever the input.
const CHECKS_PER_ROUND: usize = 20_000;
/// Gains smaller than this are floating-point noise, not improvements.
const EPSILON: f64 = 1e-12;

/// Chooses which pending requests to start on `idle` capacity now: indices into `pending`, in the
/// order to start them, whose demands together fit in `idle`.
///
/// Rules, in order:
/// 1. Starvation. Requests that have waited at least `weights.starve_after` go first, the oldest
///    first. When one of them does not fit what is left, only the starving requests before it are
///    started and the rest of the capacity is held for it: nothing younger may take the room it
///    waits for, so it starts once running jobs end. The price is capacity left idle meanwhile.
///    Requests larger than the whole machine must be refused before they reach this queue, or
///    one that starves would hold the machine for ever.
/// 2. Class. Family requests are chosen first, on all the capacity left; other requests fill
///    what the family leaves.
/// 3. Fill. Within a class, the chosen set fills the capacity as fully as it can
///    ([`utilisation`]). Each request's share counts up to 2% more the heavier its weight,
///    `(1 + weights.reputation × reputation) × (1 + waited / weights.aging)` (a zero `aging`
///    turns ageing off), so reputation and waiting decide between near-equal fills.
///
/// A request whose demand is zero, or that does not fit `idle` even alone, is never chosen.
/// Without starving requests the chosen set is maximal: nothing left out would still fit.
///
/// The fill is a multi-dimensional knapsack, solved approximately with bounded work (about a
/// millisecond for 10,000 requests; benchmark B6). Greedy first-fit passes take the largest
/// requests first. As the largest alone can use up one resource and strand another (all the
/// memory taken, cores left that no request can use), three of the passes take a request only
/// while the spare shares of the essential resources, those nearly every request needs, stay
/// within a band of each other, then fill the rest. Each pass, and a first-fit pass in arrival
/// order, is improved by a local search that swaps one or two chosen requests for one to three
/// of the most valuable others, and the best fill is kept. The arrival-order pass holds all
/// that [`first_come_first_served`] would start, and no fill that falls short of it is kept, so
/// within a class `choose` never fills less than first come, first served.
pub fn choose(idle: &Amount, pending: &[Pending], weights: &Weights) -> Vec<usize> {
    let capacity = idle.vector();
    let mut left = capacity;
    let mut chosen = Vec::new();

    let mut starving: Vec<usize> = (0..pending.len())
        .filter(|&i| pending[i].waited >= weights.starve_after && !pending[i].demand.is_zero())
        .collect();
    starving.sort_by(|&a, &b| pending[b].waited.cmp(&pending[a].waited).then(a.cmp(&b)));
    for index in starving {
        let need = pending[index].demand.vector();
        if !fits(&need, &left) {
            return chosen;
        }
        left = minus(&left, &need);
        chosen.push(index);
    }

    for class in [Class::Family, Class::Other] {
        let items: Vec<Item> = pending
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.class == class
                    && p.waited < weights.starve_after
                    && !p.demand.is_zero()
                    && fits(&p.demand.vector(), &left)
            })
            .map(|(index, p)| Item::new(index, p, &capacity, weights))
            .collect();
        let mut picked: Vec<&Item> =
            fill_class(&items, left, idle).into_iter().map(|at| &items[at]).collect();
        picked.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.index.cmp(&b.index)));
        for item in picked {
            left = minus(&left, &item.need);
            chosen.push(item.index);
        }
    }
    chosen
}

/// The baseline B6 compares [`choose`] with: a plain FIFO queue. In slice (arrival) order, starts
/// each request while it fits what is left and stops at the first that does not, so one large
/// request at the head blocks everything behind it. Class, reputation and waiting are ignored;
/// zero demands fit and are started.
pub fn first_come_first_served(idle: &Amount, pending: &[Pending]) -> Vec<usize> {
    let mut left = *idle;
    let mut chosen = Vec::new();
    for (index, request) in pending.iter().enumerate() {
        if !request.demand.fits_in(&left) {
            break;
        }
        left = left.saturating_sub(&request.demand);
        chosen.push(index);
    }
    chosen
}

/// The consumer's side: which providers to ask first for `demand`. Indices into `candidates` of
/// those whose `free` capacity fits the demand and whose price is at most `max_price_per_hour`
/// (`None`: any price), best first: those whose sharing window covers the job before those whose
/// does not; then the best fit, the one the demand fills most (highest [`utilisation`] of its
/// free capacity), so large machines stay free for large jobs; then higher reputation; then lower
/// price; then lower index. Fits count as equal when they agree to 9 decimal places.
pub fn rank(demand: &Amount, max_price_per_hour: Option<u64>, candidates: &[Candidate]) -> Vec<usize> {
    let mut ranked: Vec<(usize, &Candidate, i64)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            demand.fits_in(&c.free) && max_price_per_hour.is_none_or(|ceiling| c.price_per_hour <= ceiling)
        })
        // Rounded to a whole number so that near-equal fits are equal and the order stays total.
        .map(|(index, c)| (index, c, (utilisation(&c.free, demand) * 1e9).round() as i64))
        .collect();
    ranked.sort_by(|(ia, a, fa), (ib, b, fb)| {
        b.window_covers
            .cmp(&a.window_covers)
            .then(fb.cmp(fa))
            .then(clean_reputation(b.reputation).total_cmp(&clean_reputation(a.reputation)))
            .then(a.price_per_hour.cmp(&b.price_per_hour))
            .then(ia.cmp(ib))
    });
    ranked.into_iter().map(|(index, _, _)| index).collect()
}

/// A reputation within 0..=1; an unknown (NaN) one counts as 0.
fn clean_reputation(reputation: f64) -> f64 {
    if reputation.is_nan() { 0.0 } else { reputation.clamp(0.0, 1.0) }
}

fn fits(need: &Vector, left: &Vector) -> bool {
    need.iter().zip(left).all(|(n, l)| n <= l)
}

fn plus(a: &Vector, b: &Vector) -> Vector {
    std::array::from_fn(|d| a[d].saturating_add(b[d]))
}

fn minus(a: &Vector, b: &Vector) -> Vector {
    std::array::from_fn(|d| a[d].saturating_sub(b[d]))
}

/// A pending request as the search sees it.
#[derive(Debug, Clone, Copy)]
struct Item {
    /// Its index in the caller's slice.
    index: usize,
    demand: Amount,
    need: Vector,
    /// Its weight from reputation and waiting, at least 1.
    weight: f64,
    /// What the search maximises: its share, raised by up to [`NEAR_TIE`] for heavy weights.
    value: f64,
}

impl Item {
    fn new(index: usize, request: &Pending, capacity: &Vector, weights: &Weights) -> Item {
        let need = request.demand.vector();
        // What it adds to the utilisation of the whole idle capacity.
        let mut share = 0.0;
        let mut dimensions = 0u32;
        for (have, take) in capacity.iter().zip(need) {
            if *have > 0 {
                share += take as f64 / *have as f64;
                dimensions += 1;
            }
        }
        let share = if dimensions == 0 { 0.0 } else { share / f64::from(dimensions) };
        let factor = if weights.reputation.is_nan() { 0.0 } else { weights.reputation.clamp(0.0, 1e6) };
        let ageing = if weights.aging.is_zero() {
            1.0
        } else {
            1.0 + request.waited.as_secs_f64() / weights.aging.as_secs_f64()
        };
        let weight = (1.0 + factor * clean_reputation(request.reputation)) * ageing;
        let value = share * (1.0 + NEAR_TIE * (1.0 - 1.0 / weight));
        Item { index, demand: request.demand, need, weight, value }
    }
}

/// One candidate fill: which items (positions in the class's list) it takes.
#[derive(Debug, Clone)]
struct Fill {
    taken: Vec<bool>,
    members: Vec<usize>,
    left: Vector,
    value: f64,
}

impl Fill {
    fn new(count: usize, left: Vector) -> Fill {
        Fill { taken: vec![false; count], members: Vec::new(), left, value: 0.0 }
    }

    fn add(&mut self, items: &[Item], at: usize) {
        self.taken[at] = true;
        self.members.push(at);
        self.left = minus(&self.left, &items[at].need);
        self.value += items[at].value;
    }

    fn remove(&mut self, items: &[Item], at: usize) {
        self.taken[at] = false;
        self.members.retain(|&m| m != at);
        self.left = plus(&self.left, &items[at].need);
        self.value -= items[at].value;
    }

    /// First fit: takes each item of `order` that still fits.
    fn first_fit(&mut self, items: &[Item], order: &[usize]) {
        for &at in order {
            if !self.taken[at] && fits(&items[at].need, &self.left) {
                self.add(items, at);
            }
        }
    }

    /// First fit that takes an item only if, after it, the shares of `capacity` left of the
    /// `balanced` resources are within `band` of each other.
    fn first_fit_balanced(
        &mut self,
        items: &[Item],
        order: &[usize],
        capacity: &Vector,
        balanced: &[usize],
        band: f64,
    ) {
        for &at in order {
            let need = &items[at].need;
            if self.taken[at] || !fits(need, &self.left) {
                continue;
            }
            let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
            for &d in balanced {
                let spare = self.left[d].saturating_sub(need[d]) as f64 / capacity[d] as f64;
                low = low.min(spare);
                high = high.max(spare);
            }
            if high - low <= band {
                self.add(items, at);
            }
        }
    }

    fn used(&self, items: &[Item]) -> Amount {
        self.members.iter().fold(Amount::ZERO, |sum, &at| sum.saturating_add(&items[at].demand))
    }
}

/// One, two or three items taken out of, or put into, a fill together.
#[derive(Debug, Clone, Copy)]
struct Group {
    parts: [usize; 3],
    len: usize,
    need: Vector,
    value: f64,
}

impl Group {
    fn parts(&self) -> &[usize] {
        self.parts.get(..self.len).unwrap_or(&[])
    }
}

/// Every single item of `positions`, every pair among its first `pairs_among`, and every triple
/// among its first `triples_among`.
fn groups(positions: &[usize], items: &[Item], pairs_among: usize, triples_among: usize) -> Vec<Group> {
    let group = |parts: &[usize]| {
        let mut group = Group { parts: [0; 3], len: parts.len(), need: [0; 4], value: 0.0 };
        for (slot, &at) in group.parts.iter_mut().zip(parts) {
            *slot = at;
            group.need = plus(&group.need, &items[at].need);
            group.value += items[at].value;
        }
        group
    };
    let mut groups: Vec<Group> = positions.iter().map(|&at| group(&[at])).collect();
    let paired = &positions[..positions.len().min(pairs_among)];
    for (i, &a) in paired.iter().enumerate() {
        for &b in &paired[i + 1..] {
            groups.push(group(&[a, b]));
        }
    }
    let tripled = &positions[..positions.len().min(triples_among)];
    for (i, &a) in tripled.iter().enumerate() {
        for (j, &b) in tripled.iter().enumerate().skip(i + 1) {
            for &c in &tripled[j + 1..] {
                groups.push(group(&[a, b, c]));
            }
        }
    }
    groups
}

/// The best fill of `left` with `items` (a class's requests that fit it, in arrival order), as
/// positions in `items`.
fn fill_class(items: &[Item], left: Vector, idle: &Amount) -> Vec<usize> {
    let count = items.len();
    if count == 0 {
        return Vec::new();
    }
    // Everything first come, first served starts is in here: it stops at the first misfit.
    let arrival: Vec<usize> = (0..count).collect();
    let mut floor = Fill::new(count, left);
    floor.first_fit(items, &arrival);
    let floor_utilisation = utilisation(idle, &floor.used(items));

    // Greedy passes, largest first. Taking the largest requests alone can use up one resource
    // and strand the rest of another (all memory gone, cores left that no request can use), so
    // the balanced passes take a request only if it keeps the essential resources' spare
    // shares close, then fill what is left unconstrained.
    let by_value = descending(count, |at| items[at].value);
    let essential: Vec<usize> = (0..4)
        .filter(|&d| {
            let needing = items.iter().filter(|item| item.need[d] > 0).count();
            left[d] > 0 && needing as f64 >= ESSENTIAL * count as f64
        })
        .collect();
    let ins = swap_ins(items, &by_value);
    // Each start, and the arrival-order pass, improved by local search; the best is kept if it
    // fills at least as much as the arrival-order pass.
    let mut best = floor.clone();
    let mut starts = Vec::with_capacity(BANDS.len() + 1);
    for band in BANDS {
        if band.is_finite() && essential.len() < 2 {
            continue;
        }
        let mut fill = Fill::new(count, left);
        fill.first_fit_balanced(items, &by_value, &left, &essential, band);
        fill.first_fit(items, &by_value);
        starts.push(fill);
    }
    starts.push(floor);
    for mut fill in starts {
        improve(&mut fill, items, &by_value, &ins);
        if fill.value > best.value + EPSILON && utilisation(idle, &fill.used(items)) >= floor_utilisation {
            best = fill;
        }
    }
    best.members
}

/// Positions `0..count` by `key`, largest first, ties by position.
fn descending(count: usize, key: impl Fn(usize) -> f64) -> Vec<usize> {
    let mut keyed: Vec<(u64, usize)> = (0..count).map(|at| (!sort_key(key(at)), at)).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, at)| at).collect()
}

/// An integer that sorts as `f64::total_cmp` does, so sorts compare plain integers.
fn sort_key(x: f64) -> u64 {
    let bits = x.to_bits();
    if bits >> 63 == 1 { !bits } else { bits | (1 << 63) }
}

fn sorted(groups: Vec<Group>, key: impl Fn(&Group) -> u64) -> Vec<Group> {
    let mut keyed: Vec<(u64, usize)> = groups.iter().enumerate().map(|(i, g)| (key(g), i)).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, i)| groups[i]).collect()
}

/// What the local search may swap in: single requests, pairs and triples of the most valuable,
/// most valuable first.
fn swap_ins(items: &[Item], by_value: &[usize]) -> Vec<Group> {
    let mut pool: Vec<usize> = Vec::with_capacity(POOL);
    for &at in by_value.iter().take(POOL_SCAN) {
        if pool.iter().filter(|&&p| items[p].need == items[at].need).count() < POOL_SAME {
            pool.push(at);
            if pool.len() == POOL {
                break;
            }
        }
    }
    sorted(groups(&pool, items, IN_PAIRS_AMONG, IN_TRIPLES_AMONG), |g| !sort_key(g.value))
}

/// Local search: makes the best swap of one or two chosen items for one to three unchosen ones
/// of `ins` that raises the fill's value, refills in `order`, and repeats, within [`ROUNDS`].
fn improve(fill: &mut Fill, items: &[Item], order: &[usize], ins: &[Group]) {
    for _ in 0..ROUNDS {
        let Some((out, into)) = best_swap(fill, items, ins) else { break };
        for &at in out.parts() {
            fill.remove(items, at);
        }
        for &at in into.parts() {
            fill.add(items, at);
        }
        fill.first_fit(items, order);
    }
}

fn best_swap(fill: &Fill, items: &[Item], ins: &[Group]) -> Option<(Group, Group)> {
    let mut members = fill.members.clone();
    members.sort_unstable_by_key(|&at| (sort_key(items[at].value), at));
    // Out cheapest first, as they leave the most room for a gain; in most valuable first.
    let outs = sorted(groups(&members, items, OUT_PAIRS_AMONG, 0), |g| sort_key(g.value));
    let mut best = None;
    let mut best_gain = EPSILON;
    let mut checks = 0;
    for out in &outs {
        let room = plus(&fill.left, &out.need);
        for into in ins {
            if into.value - out.value <= best_gain {
                break;
            }
            checks += 1;
            if checks > CHECKS_PER_ROUND {
                return best;
            }
            if fits(&into.need, &room) && !into.parts().iter().any(|&at| fill.taken[at]) {
                best_gain = into.value - out.value;
                best = Some((*out, *into));
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests;
