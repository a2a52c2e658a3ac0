//! RDMA device discovery from sysfs (`/sys/class/infiniband`), for `rmc devices` and for
//! choosing a device for `--transport rdma|auto`. Reading sysfs needs no RDMA library, so it
//! also explains what is missing on a host without any RDMA stack.
//!
//! ```text
//! /sys/class/infiniband/<dev>/node_type                    "1: CA"
//! /sys/class/infiniband/<dev>/ports/<n>/state              "4: ACTIVE"
//! /sys/class/infiniband/<dev>/ports/<n>/phys_state         "5: LinkUp"
//! /sys/class/infiniband/<dev>/ports/<n>/link_layer         "Ethernet" | "InfiniBand"
//! /sys/class/infiniband/<dev>/ports/<n>/gids/<i>           "fe80:0000:...:0001" (all zero: unused)
//! /sys/class/infiniband/<dev>/ports/<n>/gid_attrs/types/<i> "RoCE v2" | "IB/RoCE v1"
//! /sys/class/infiniband/<dev>/ports/<n>/gid_attrs/ndevs/<i> "veth0" (RoCE: the netdev)
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Where the kernel lists RDMA devices.
pub const SYSFS_ROOT: &str = "/sys/class/infiniband";

/// One GID table entry in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gid {
    /// Index in the port's GID table.
    pub index: u32,
    /// The GID.
    pub gid: Ipv6Addr,
    /// "RoCE v2", "IB/RoCE v1", or empty when the kernel does not say.
    pub kind: String,
    /// The network device it belongs to (RoCE), if any.
    pub netdev: Option<String>,
}

impl Gid {
    /// The IP address the GID stands for (RoCE v2 GIDs are IPv4-mapped or IPv6 addresses).
    pub fn ip(&self) -> Option<IpAddr> {
        if self.kind != "RoCE v2" {
            return None;
        }
        Some(match self.gid.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(self.gid),
        })
    }
}

/// One port of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Port number (from 1).
    pub num: u32,
    /// Logical state, e.g. "4: ACTIVE".
    pub state: String,
    /// Physical state, e.g. "5: LinkUp".
    pub phys_state: String,
    /// "Ethernet" (RoCE) or "InfiniBand".
    pub link_layer: String,
    /// GIDs in use.
    pub gids: Vec<Gid>,
}

impl Port {
    /// Why rmc cannot use this port, or `None` if it can.
    pub fn unusable_reason(&self) -> Option<String> {
        if !self.state.contains("ACTIVE") {
            return Some(format!(
                "port state is {:?}, not ACTIVE (is the link up? for Soft-RoCE: is its netdev up?)",
                self.state
            ));
        }
        if self.gids.is_empty() {
            return Some("no GID in use (for RoCE: give the netdev an IP address)".into());
        }
        if self.link_layer == "Ethernet" && !self.gids.iter().any(|g| g.ip().is_some()) {
            return Some("no RoCE v2 GID with an IP address (rdma_cm needs one to route)".into());
        }
        None
    }
}

/// An RDMA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Kernel name (e.g. `rxe0`, `mlx5_0`).
    pub name: String,
    /// Node type, e.g. "1: CA".
    pub node_type: String,
    /// Ports.
    pub ports: Vec<Port>,
}

/// Reading sysfs failed or found nothing.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// The class directory does not exist.
    #[error(
        "{0} does not exist: this kernel has no RDMA stack or no RDMA driver is loaded \
         (hardware: the driver, e.g. mlx5_ib; without hardware: Soft-RoCE, see soft-roce/README.md)"
    )]
    NoRdmaStack(PathBuf),
    /// Reading a file failed.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &Path) -> Result<String, DevicesError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| DevicesError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn read_opt(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn numbered_entries(dir: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

fn parse_gid(s: &str) -> Option<Ipv6Addr> {
    s.parse().ok()
}

/// Lists the RDMA devices under `root` (normally [`SYSFS_ROOT`]), sorted by name.
pub fn list(root: &Path) -> Result<Vec<Device>, DevicesError> {
    if !root.is_dir() {
        return Err(DevicesError::NoRdmaStack(root.to_path_buf()));
    }
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(|source| DevicesError::Read {
            path: root.to_path_buf(),
            source,
        })?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let dev = root.join(&name);
            let ports = numbered_entries(&dev.join("ports"))
                .into_iter()
                .map(|num| {
                    let p = dev.join("ports").join(num.to_string());
                    let gids = numbered_entries(&p.join("gids"))
                        .into_iter()
                        .filter_map(|index| {
                            let gid =
                                parse_gid(&read_opt(&p.join("gids").join(index.to_string()))?)?;
                            if gid.is_unspecified() {
                                return None;
                            }
                            let attr = |kind: &str| {
                                read_opt(&p.join("gid_attrs").join(kind).join(index.to_string()))
                            };
                            Some(Gid {
                                index,
                                gid,
                                kind: attr("types").unwrap_or_default(),
                                netdev: attr("ndevs").filter(|n| !n.is_empty()),
                            })
                        })
                        .collect();
                    Ok(Port {
                        num,
                        state: read(&p.join("state"))?,
                        phys_state: read_opt(&p.join("phys_state")).unwrap_or_default(),
                        link_layer: read_opt(&p.join("link_layer")).unwrap_or_default(),
                        gids,
                    })
                })
                .collect::<Result<_, DevicesError>>()?;
            Ok(Device {
                node_type: read_opt(&dev.join("node_type")).unwrap_or_default(),
                name,
                ports,
            })
        })
        .collect()
}

/// A report for people: every device, port, GID, and why a port cannot be used.
pub fn report(devices: &[Device]) -> String {
    if devices.is_empty() {
        return "No RDMA devices are registered (the RDMA stack is loaded but has no device).\n"
            .into();
    }
    let mut s = String::new();
    for d in devices {
        s += &format!("{} ({})\n", d.name, d.node_type);
        for p in &d.ports {
            s += &format!(
                "  port {}: {}, {}, link layer {}\n",
                p.num, p.state, p.phys_state, p.link_layer
            );
            for g in &p.gids {
                s += &format!(
                    "    gid {:>3} {:<39} {:<10} {}{}\n",
                    g.index,
                    g.gid.to_string(),
                    g.kind,
                    g.netdev.as_deref().unwrap_or("-"),
                    g.ip()
                        .map_or(String::new(), |ip| format!("  -> local address {ip}")),
                );
            }
            match p.unusable_reason() {
                None => s += "    usable by rmc\n",
                Some(why) => s += &format!("    NOT usable by rmc: {why}\n"),
            }
        }
    }
    s
}

/// The device and port whose RoCE v2 GID carries `ip`, if any (which device a local address
/// maps to).
pub fn device_for_ip(devices: &[Device], ip: IpAddr) -> Option<(&Device, &Port, &Gid)> {
    devices.iter().find_map(|d| {
        d.ports.iter().find_map(|p| {
            p.gids
                .iter()
                .find(|g| g.ip() == Some(ip))
                .map(|g| (d, p, g))
        })
    })
}

/// `::ffff:a.b.c.d` for an IPv4 address, as RoCE v2 GIDs write it.
pub fn ipv4_gid(ip: Ipv4Addr) -> Ipv6Addr {
    ip.to_ipv6_mapped()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{content}\n")).unwrap();
    }

    fn fake_sysfs(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("rmc-sysfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // rxe0: active, link-local v1 + v2 GIDs and an IPv4 v2 GID on veth0.
        write(&root, "rxe0/node_type", "1: CA");
        write(&root, "rxe0/ports/1/state", "4: ACTIVE");
        write(&root, "rxe0/ports/1/phys_state", "5: LinkUp");
        write(&root, "rxe0/ports/1/link_layer", "Ethernet");
        write(
            &root,
            "rxe0/ports/1/gids/0",
            "fe80:0000:0000:0000:a8bb:ccff:fedd:eeff",
        );
        write(&root, "rxe0/ports/1/gid_attrs/types/0", "IB/RoCE v1");
        write(&root, "rxe0/ports/1/gid_attrs/ndevs/0", "veth0");
        write(
            &root,
            "rxe0/ports/1/gids/1",
            "0000:0000:0000:0000:0000:ffff:0a00:0001",
        );
        write(&root, "rxe0/ports/1/gid_attrs/types/1", "RoCE v2");
        write(&root, "rxe0/ports/1/gid_attrs/ndevs/1", "veth0");
        write(
            &root,
            "rxe0/ports/1/gids/2",
            "0000:0000:0000:0000:0000:0000:0000:0000",
        );
        // rxe1: down.
        write(&root, "rxe1/node_type", "1: CA");
        write(&root, "rxe1/ports/1/state", "1: DOWN");
        write(&root, "rxe1/ports/1/phys_state", "3: Disabled");
        write(&root, "rxe1/ports/1/link_layer", "Ethernet");
        root
    }

    #[test]
    fn lists_devices_ports_gids_and_reasons() {
        let root = fake_sysfs("list");
        let devs = list(&root).unwrap();
        assert_eq!(devs.len(), 2);
        let p = &devs[0].ports[0];
        assert_eq!(p.gids.len(), 2, "the all-zero GID is not in use");
        assert_eq!(p.gids[1].ip(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(p.gids[0].ip(), None, "a v1 GID is not an IP route");
        assert_eq!(p.unusable_reason(), None);
        let down = devs[1].ports[0].unusable_reason().unwrap();
        assert!(down.contains("not ACTIVE"), "{down}");
        let (d, port, g) = device_for_ip(&devs, "10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!((d.name.as_str(), port.num, g.index), ("rxe0", 1, 1));
        assert!(device_for_ip(&devs, "10.0.0.2".parse().unwrap()).is_none());
        let r = report(&devs);
        assert!(
            r.contains("-> local address 10.0.0.1") && r.contains("NOT usable by rmc"),
            "{r}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn explains_a_host_without_rdma() {
        let err = list(Path::new("/nonexistent/infiniband")).unwrap_err();
        assert!(err.to_string().contains("no RDMA stack"), "{err}");
        assert_eq!(
            ipv4_gid("10.0.0.1".parse().unwrap()).to_string(),
            "::ffff:10.0.0.1"
        );
    }
}
