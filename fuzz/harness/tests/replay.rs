//! Regression replay on stable: every file of each target's seed corpus
//! (`fuzz/corpus/<target>/`) and regressions (`fuzz/regressions/<target>/`)
//! through the same harness code libFuzzer runs, plus the generated seeds.

use std::path::{Path, PathBuf};

use fuzz_harness::TARGETS;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn replay(kind: &str) -> usize {
    let mut count = 0;
    for (name, run) in TARGETS {
        for file in files(&fuzz_dir().join(kind).join(name)) {
            let bytes = std::fs::read(&file).unwrap();
            eprintln!("replaying {}", file.display());
            run(&bytes);
            count += 1;
        }
    }
    count
}

#[test]
fn fuzz_corpus_replays_without_a_crash() {
    assert!(
        replay("corpus") > 0,
        "no corpus under {}",
        fuzz_dir().display()
    );
}

#[test]
fn fuzz_regressions_stay_fixed() {
    replay("regressions");
}

#[test]
fn every_target_has_a_seed_corpus_in_git() {
    for (name, _) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        assert!(
            files(&dir).iter().any(|f| f
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")),
            "{} has no seed-* files: run `cargo run -p fuzz-harness --example seeds`",
            dir.display()
        );
    }
}

#[test]
fn generated_seeds_run_clean() {
    for (target, name, bytes) in fuzz_harness::seeds::all() {
        let run = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
        eprintln!("seed {target}/{name}");
        run(&bytes);
    }
}
