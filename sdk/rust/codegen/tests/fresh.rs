//! The committed generated code matches what the protos generate now.

#[test]
fn generated_code_is_fresh() {
    let stale = codegen::run(&codegen::root(), true).expect("generation runs");
    assert!(stale.is_empty(), "stale generated files (run `cargo run -p codegen` and commit): {stale:?}");
}
