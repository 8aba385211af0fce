//! Grows its memory a mebibyte at a time, touching every page, until it cannot.

fn main() {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = Vec::new();
        if chunk.try_reserve_exact(1 << 20).is_err() {
            println!("allocation refused after {} MiB", kept.len());
            std::process::exit(3);
        }
        chunk.resize(1 << 20, 1u8);
        kept.push(chunk);
    }
}
