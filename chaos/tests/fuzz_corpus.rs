//! Replays the fuzz corpus kept in `chaos/fuzz/corpus/<target>/` and every crash reproducer in
//! `chaos/fuzz/artifacts/<target>/` through the target's check: a bug the fuzzer once found stays fixed.

use std::path::Path;

use shoal_chaos::inputs::TARGETS;

#[test]
fn every_kept_input_passes_its_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, check) in TARGETS {
        let corpus = root.join("corpus").join(name);
        assert!(corpus.is_dir(), "no seed corpus for {name} at {}", corpus.display());
        for dir in [corpus, root.join("artifacts").join(name)] {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| check(&data));
                assert!(outcome.is_ok(), "{name}: {} fails its check", path.display());
                replayed += 1;
            }
        }
    }
    assert!(replayed >= TARGETS.len(), "only {replayed} inputs replayed");
}
