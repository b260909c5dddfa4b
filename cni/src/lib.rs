//! Skiff's CNI side.
//!
//! - [`proto`]: the messages the `skiff-cni` plugin and node-agent exchange
//!   over node-agent's Unix socket (one JSON line each way).
//! - [`conflist`]: inserting the plugin into the node's primary CNI
//!   configuration and taking it out again, keeping the rest of the file
//!   byte for byte.
//! - [`plugin`]: the plugin itself (the `skiff-cni` binary is a thin
//!   `main` over it), following the CNI spec's contract for chained plugins.

pub mod conflist;
pub mod plugin;
pub mod proto;

/// The plugin's `type` in a CNI config, and its binary name.
pub const PLUGIN_TYPE: &str = "skiff-cni";
/// node-agent's default socket for the plugin.
pub const DEFAULT_SOCKET: &str = "/var/run/skiff/cni.sock";
/// Where node-agent publishes which namespaces are enrolled, for the plugin
/// to decide whether to fail closed when node-agent cannot be reached. On
/// disk (not tmpfs): after a reboot the runtime may recreate sandboxes before
/// node-agent is back, and a lost file makes the plugin fail closed for
/// every namespace but kube-system and skiff-system.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/skiff/cni-state.json";
