//! Does nothing and exits 0: the job whose start-up is all there is to time (benchmark B2).

fn main() {}
