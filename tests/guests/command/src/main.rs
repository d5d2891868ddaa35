fn main() {
    println!("a wasi:cli/command component, not a beamlet function");
}
