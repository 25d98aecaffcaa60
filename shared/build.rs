// sqlx::migrate! and include_str! embed migrations/ at compile time; make Cargo rebuild
// this crate when a migration or template is added or changed.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
