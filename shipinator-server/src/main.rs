//! The `shipinator` binary.

fn main() {
    println!("shipinator");
}
