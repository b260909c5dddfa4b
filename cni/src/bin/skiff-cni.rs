//! `skiff-cni`: the chained CNI plugin (see `skiff_cni::plugin`).

fn main() {
    std::process::exit(skiff_cni::plugin::main_with_io());
}
