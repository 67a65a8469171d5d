//! The systemd units (`systemd/` in the repository), rendered for the
//! installed binary and written by `sgl node service install`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The hardened node unit; `@SGL_BIN@` stands for the binary's path.
pub const NODE_UNIT: &str = include_str!("../../systemd/sgl-node.service");
/// The coordinator unit, same placeholder.
pub const COORDINATOR_UNIT: &str = include_str!("../../systemd/sgl-coordinator.service");
pub const NODE_UNIT_NAME: &str = "sgl-node.service";

/// Fill in the binary path. Paths with whitespace or characters systemd
/// would interpret are refused rather than quoted.
pub fn render(unit: &str, bin: &Path) -> io::Result<String> {
    let s = bin
        .to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "binary path is not UTF-8"))?;
    if !bin.is_absolute()
        || s.chars()
            .any(|c| c.is_whitespace() || "%$\\\"'".contains(c))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("binary path {s:?} must be absolute, without spaces, quotes, % or $"),
        ));
    }
    Ok(unit.replace("@SGL_BIN@", s))
}

/// Write the node unit into `unit_dir` (0644, atomically); returns its path.
pub fn install_node_unit(unit_dir: &Path, bin: &Path) -> io::Result<PathBuf> {
    let text = render(NODE_UNIT, bin)?;
    fs::create_dir_all(unit_dir)?;
    let path = unit_dir.join(NODE_UNIT_NAME);
    let tmp = unit_dir.join(format!(".{NODE_UNIT_NAME}.tmp"));
    fs::write(&tmp, text)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    }
    fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_hardened_and_rendered() {
        for unit in [NODE_UNIT, COORDINATOR_UNIT] {
            for line in [
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "ProtectHome=yes",
                "CapabilityBoundingSet=",
                "SystemCallFilter=@system-service",
                "SystemCallErrorNumber=EPERM",
                "LimitNOFILE=65536",
            ] {
                assert!(unit.lines().any(|l| l == line), "{line}");
            }
        }
        // The GPU and the TEE guest devices stay reachable for the node.
        assert!(NODE_UNIT.contains("DeviceAllow=/dev/sev-guest rw"));
        assert!(NODE_UNIT.contains("DeviceAllow=char-nvidia-frontend rw"));
        let r = render(NODE_UNIT, Path::new("/usr/local/bin/sgl")).unwrap();
        assert!(r.contains("ExecStart=/usr/local/bin/sgl node start"));
        assert!(!r.contains("@SGL_BIN@"));
        assert!(render(NODE_UNIT, Path::new("/opt/my dir/sgl")).is_err());
        assert!(render(NODE_UNIT, Path::new("sgl")).is_err());
    }
}
