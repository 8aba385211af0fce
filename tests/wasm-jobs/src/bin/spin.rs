//! Counts forever, printing a line every so often: a job that never ends on its own.

fn main() {
    let mut n: u64 = 0;
    loop {
        n = n.wrapping_add(1);
        if n % 200_000_000 == 0 {
            println!("still spinning at {n}");
        }
        std::hint::black_box(n);
    }
}
