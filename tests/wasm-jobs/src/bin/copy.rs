//! Reads `/in/<first arg>`, writes its bytes reversed to `/out/<second arg>`, records its args
//! and `KEY` in `/out/seen.txt`, and exits with `EXIT_CODE` (default 0).

use std::fs;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (input, output) = (&args[1], &args[2]);
    let mut bytes = fs::read(format!("/in/{input}")).expect("reading the input");
    bytes.reverse();
    fs::write(format!("/out/{output}"), &bytes).expect("writing the output");
    let key = std::env::var("KEY").unwrap_or_default();
    fs::write("/out/seen.txt", format!("args={}\nKEY={key}\n", args[1..].join(" "))).expect("writing seen.txt");
    println!("copied {} bytes", bytes.len());
    eprintln!("a note on stderr");
    let code = std::env::var("EXIT_CODE").ok().and_then(|c| c.parse().ok()).unwrap_or(0);
    std::process::exit(code);
}
