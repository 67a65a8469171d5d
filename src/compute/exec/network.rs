//! The network policy of the sandboxes.
//!
//! `None` gives every sandbox its own empty network namespace (bwrap's
//! `--unshare-net`: only a loopback device that reaches nothing outside).
//!
//! `Egress` gives every run a network namespace of its own too, but one
//! created by root (`ip netns add`) before the sandbox starts, so that it
//! belongs to the host's user namespace: bwrap joins it (`setns` before
//! exec, no `--unshare-net`) and the code, in bwrap's user namespace with
//! every capability dropped, holds no `CAP_NET_ADMIN` over it and cannot
//! change its routes or rules. (pasta cannot attach to a namespace bwrap
//! creates inside its own user namespace: it may not write that namespace's
//! uid map.) A pasta process, run as root, gives the namespace a copy of
//! the host's address and routes and carries its connections out through
//! ordinary host sockets; policy-routing rules ([`rules`]) prohibit every
//! non-public range and every host address, and DNS goes through pasta's
//! forwarder to the host's resolver. The namespace is deleted after the run
//! and its pasta quits with it; if pasta dies early the namespace has no
//! way out at all.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{SandboxConfig, SandboxError};

/// What the code may reach on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkPolicy {
    /// No network at all: a fresh network namespace with nothing in it.
    #[default]
    None,
    /// Outbound internet only; never the host's loopback or private ranges.
    Egress,
}

impl NetworkPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkPolicy::None => "none",
            NetworkPolicy::Egress => "egress",
        }
    }
}

impl fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NetworkPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(NetworkPolicy::None),
            "egress" => Ok(NetworkPolicy::Egress),
            other => Err(format!("unknown network policy {other:?} (none | egress)")),
        }
    }
}

/// Checks the tools a policy needs, so that a pool is never started with
/// less isolation than its configuration asks for.
pub(crate) fn check(cfg: &SandboxConfig) -> Result<(), SandboxError> {
    match cfg.network {
        NetworkPolicy::None => Ok(()),
        NetworkPolicy::Egress => {
            for (what, path) in [("pasta", &cfg.pasta), ("ip", &cfg.ip)] {
                super::pool::executable(path).map_err(|e| {
                    SandboxError::Setup(format!(
                        "network policy egress needs {what} at {}: {e}",
                        path.display()
                    ))
                })?;
            }
            Ok(())
        }
    }
}

/// What sandboxed code may never reach under `egress`: loopback, private,
/// shared (CGNAT), link-local, documentation, benchmarking, multicast and
/// reserved ranges, and the prefixes that translate to IPv4 (NAT64, 6to4,
/// Teredo), which could carry a private IPv4 address.
pub const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The IPv6 counterpart of [`BLOCKED_V4`].
pub const BLOCKED_V6: &[&str] = &[
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/23",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// The address the sandbox's `/etc/resolv.conf` names: pasta forwards DNS
/// sent there (port 53 only) to the host's own resolver, which may itself
/// sit in a blocked range.
pub const DNS_FORWARD_ADDR: &str = "169.254.0.53";

/// The name prefix of the network namespaces of egress runs
/// (`/run/netns/sgl-egress-<coordinator pid>-<sandbox id>`).
pub const NETNS_PREFIX: &str = "sgl-egress-";

/// Where `ip netns` keeps named network namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The file, in the work root, that becomes the sandbox's
/// `/etc/resolv.conf` under `egress`.
pub(crate) const RESOLV_CONF: &str = "resolv.conf";

/// The policy-routing rules of an egress namespace, for `ip -4 -batch` and
/// `ip -6 -batch`: DNS to [`DNS_FORWARD_ADDR`] allowed first, then a
/// `prohibit` rule for every blocked range and every address the host has.
///
/// Rules rather than routes: a rule is consulted before any routing table,
/// so the more specific routes pasta copies from the host (its subnet, its
/// gateway) cannot win over a blocked range the way they would over a
/// `prohibit` route by longest-prefix match. The `local` table (priority 0)
/// still comes first, so the namespace's own addresses (its loopback, the
/// host address pasta copies in) stay local to the namespace, which holds
/// nothing but the one run's processes. nftables is not needed: the rules
/// act on every socket's route lookup, TCP, UDP and raw alike, and the code
/// holds no capability over the namespace to change them.
pub(crate) fn rules(host_addrs: &[std::net::IpAddr]) -> (String, String) {
    let mut v4 = String::new();
    let mut v6 = String::new();
    for proto in ["udp", "tcp"] {
        v4.push_str(&format!(
            "rule add pref 100 to {DNS_FORWARD_ADDR}/32 ipproto {proto} dport 53 lookup main\n"
        ));
    }
    for r in BLOCKED_V4 {
        v4.push_str(&format!("rule add pref 200 to {r} prohibit\n"));
    }
    for r in BLOCKED_V6 {
        v6.push_str(&format!("rule add pref 200 to {r} prohibit\n"));
    }
    for a in host_addrs {
        match a {
            std::net::IpAddr::V4(a) => {
                v4.push_str(&format!("rule add pref 300 to {a}/32 prohibit\n"))
            }
            std::net::IpAddr::V6(a) => {
                v6.push_str(&format!("rule add pref 300 to {a}/128 prohibit\n"))
            }
        }
    }
    (v4, v6)
}

#[cfg(target_os = "linux")]
pub(crate) use linux::{prepare_egress, EgressNs};

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod linux {
    use std::io::Write as _;
    use std::net::IpAddr;
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};

    use super::super::{SandboxConfig, SandboxError};
    use super::{rules, DNS_FORWARD_ADDR, NETNS_DIR, NETNS_PREFIX, RESOLV_CONF};

    fn setup(what: &str, e: impl std::fmt::Display) -> SandboxError {
        SandboxError::Setup(format!("egress: {what}: {e}"))
    }

    /// At pool start under `egress`: the resolv.conf the sandboxes get, and
    /// the namespaces a coordinator that died left behind removed (their
    /// pasta quits when its namespace goes).
    pub(crate) fn prepare_egress(cfg: &SandboxConfig) -> Result<(), SandboxError> {
        let conf = cfg.work_root.join(RESOLV_CONF);
        std::fs::write(&conf, format!("nameserver {DNS_FORWARD_ADDR}\n"))
            .map_err(|e| setup("writing resolv.conf", e))?;
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| setup("resolv.conf mode", e))?;
        if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
            for e in entries.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let Some(pid) = name
                    .strip_prefix(NETNS_PREFIX)
                    .and_then(|r| r.split('-').next())
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = ip(&cfg.ip, &["netns", "delete", &name], None);
                }
            }
        }
        Ok(())
    }

    /// Runs `ip ARGS`, feeding `stdin` when given; its stderr in the error.
    fn ip(bin: &Path, args: &[&str], stdin: Option<&str>) -> Result<(), SandboxError> {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| setup(&format!("starting {}", bin.display()), e))?;
        // Written in full before waiting (ip reads all of it first); the
        // child is waited for even when the write fails.
        let wrote = match (stdin, child.stdin.take()) {
            (Some(text), Some(mut w)) => w.write_all(text.as_bytes()),
            _ => Ok(()),
        };
        let out = child
            .wait_with_output()
            .map_err(|e| setup("waiting for ip", e))?;
        wrote.map_err(|e| setup("writing to ip", e))?;
        if !out.status.success() {
            return Err(setup(
                &format!("ip {}", args.join(" ")),
                format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }

    /// Every address of the host's interfaces.
    fn host_addresses() -> Result<Vec<IpAddr>, SandboxError> {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `list`, which we free below.
        if unsafe { libc::getifaddrs(&mut list) } != 0 {
            return Err(setup("getifaddrs", std::io::Error::last_os_error()));
        }
        let mut addrs = Vec::new();
        let mut at = list;
        while !at.is_null() {
            // SAFETY: `at` is a node of the list getifaddrs returned; its
            // ifa_addr, when not null, points to a sockaddr of the family it
            // names.
            unsafe {
                let sa = (*at).ifa_addr;
                if !sa.is_null() {
                    match i32::from((*sa).sa_family) {
                        libc::AF_INET => {
                            let sin = &*(sa as *const libc::sockaddr_in);
                            addrs.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                        }
                        libc::AF_INET6 => {
                            let sin6 = &*(sa as *const libc::sockaddr_in6);
                            addrs.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                        }
                        _ => {}
                    }
                }
                at = (*at).ifa_next;
            }
        }
        // SAFETY: `list` came from getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(list) };
        addrs.sort();
        addrs.dedup();
        Ok(addrs)
    }

    /// The network namespace of one egress run: created by root (so the
    /// sandbox's user namespace holds no capability over it), given
    /// outbound access by its own pasta, and fenced by [`rules`]. Deleted on
    /// drop; its pasta quits when the namespace file goes.
    pub(crate) struct EgressNs {
        name: String,
        ip: PathBuf,
        /// The namespace, for `setns` before bwrap starts.
        pub(crate) fd: Option<OwnedFd>,
    }

    impl EgressNs {
        /// Blocking: runs `ip` and pasta.
        pub(crate) fn create(cfg: &SandboxConfig, tag: &str) -> Result<Self, SandboxError> {
            let name = format!("{NETNS_PREFIX}{}-{tag}", std::process::id());
            ip(&cfg.ip, &["netns", "add", &name], None)?;
            let mut ns = EgressNs {
                name,
                ip: cfg.ip.clone(),
                fd: None,
            };
            let path = format!("{NETNS_DIR}/{}", ns.name);
            // pasta returns once the namespace's interface, addresses and
            // routes are configured, then serves it in the background.
            // --runas 0: as root it would otherwise switch to nobody and
            // lose access to the root-owned namespace. --no-map-gw: the
            // gateway address is not the host. No port is forwarded inward.
            let out = Command::new(&cfg.pasta)
                .args([
                    "--quiet",
                    "--runas",
                    "0",
                    "--no-map-gw",
                    "--tcp-ports",
                    "none",
                    "--udp-ports",
                    "none",
                    "--tcp-ns",
                    "none",
                    "--udp-ns",
                    "none",
                    "--config-net",
                    "--dns-forward",
                    DNS_FORWARD_ADDR,
                    "--netns",
                    &path,
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| setup(&format!("starting {}", cfg.pasta.display()), e))?;
            if !out.status.success() {
                return Err(setup(
                    "pasta",
                    format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ));
            }
            // The rules go in after pasta's routes: its default route needs
            // a gateway that a rule for the gateway's range would make
            // unreachable. Nothing runs in the namespace until they are in.
            let (v4, v6) = rules(&host_addresses()?);
            ip(
                &ns.ip,
                &["-4", "-netns", &ns.name, "-batch", "-"],
                Some(&v4),
            )?;
            if Path::new("/proc/sys/net/ipv6").exists() {
                ip(
                    &ns.ip,
                    &["-6", "-netns", &ns.name, "-batch", "-"],
                    Some(&v6),
                )?;
            }
            let f = std::fs::File::open(&path).map_err(|e| setup("opening the namespace", e))?;
            ns.fd = Some(OwnedFd::from(f));
            Ok(ns)
        }
    }

    impl Drop for EgressNs {
        fn drop(&mut self) {
            self.fd = None;
            if let Err(e) = ip(&self.ip, &["netns", "delete", &self.name], None) {
                tracing::warn!(ns = %self.name, "egress namespace left behind: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_allow_dns_first_then_prohibit_every_blocked_range_and_host_address() {
        let host: Vec<std::net::IpAddr> =
            vec!["203.0.114.7".parse().unwrap(), "2a01::7".parse().unwrap()];
        let (v4, v6) = rules(&host);
        let v4: Vec<&str> = v4.lines().collect();
        assert!(v4[0].contains(DNS_FORWARD_ADDR) && v4[0].contains("dport 53 lookup main"));
        assert!(v4[1].contains(DNS_FORWARD_ADDR) && v4[1].contains("ipproto tcp"));
        for r in BLOCKED_V4 {
            assert!(v4.contains(&format!("rule add pref 200 to {r} prohibit").as_str()));
        }
        assert!(v4.contains(&"rule add pref 300 to 203.0.114.7/32 prohibit"));
        for r in BLOCKED_V6 {
            assert!(v6.contains(&format!("rule add pref 200 to {r} prohibit\n")));
        }
        assert!(v6.contains("rule add pref 300 to 2a01::7/128 prohibit\n"));
        // Only DNS is let through ahead of the prohibitions.
        assert!(v4
            .iter()
            .chain(v6.lines().collect::<Vec<_>>().iter())
            .all(|l| l.ends_with("prohibit") || l.contains("dport 53")));
    }

    #[test]
    fn policy_names() {
        assert_eq!("egress".parse::<NetworkPolicy>(), Ok(NetworkPolicy::Egress));
        assert!("open".parse::<NetworkPolicy>().is_err());
    }
}
