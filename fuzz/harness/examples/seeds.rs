//! Writes every target's seed corpus: `fuzz/corpus/<target>/seed-<name>`.
//!
//!     cargo run -p fuzz-harness --example seeds

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    for (target, name, bytes) in fuzz_harness::seeds::all() {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    println!("seeds written under {}", corpus.display());
    Ok(())
}
