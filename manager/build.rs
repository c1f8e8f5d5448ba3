//! Rebuilds the manager when a migration is added or changed: `embed_migrations!` reads
//! the directory at compile time, and cargo does not otherwise know it depends on it.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
