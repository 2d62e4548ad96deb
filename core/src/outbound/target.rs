//! Which URLs an endpoint may point at. Private, loopback and link-local
//! addresses are refused unless allow-listed (`ihub.allow_private_hosts`): a
//! webhook URL is user input, and without this check it reaches the database
//! server's own network (cloud metadata at 169.254.169.254, say).
//!
//! IPv6 addresses that carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`,
//! IPv4-compatible `::a.b.c.d`, SIIT `::ffff:0:a.b.c.d`, NAT64
//! `64:ff9b::a.b.c.d`, 6to4 `2002:aabb:ccdd::`) are judged by the IPv4
//! address too, since that is where the connection, or a translator on its
//! way, ends up. Teredo (`2001::/32`) and local-use NAT64 (`64:ff9b:1::/48`,
//! whose layout depends on the operator's prefix length) are refused outright.
//!
//! Allow-list entries apply per address family: an IPv4 entry allows that
//! IPv4 address wherever it appears, also embedded in IPv6; an IPv6 entry
//! allows only the IPv6 address as written, never the IPv4 address it embeds.
//! So `127.0.0.0/8` allows `[::ffff:127.0.0.1]`, while `::ffff:127.0.0.1`
//! alone does not. `*` allows everything.
//!
//! The same check ([`AllowList::allows_ip`]) judges literal addresses in URLs
//! and every address a host name resolves to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use url::{Host, Url};

pub const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TargetError {
    #[error("\"{0}\" is not a valid URL")]
    Unparsable(String),
    #[error("URL scheme \"{0}\" is not supported; use http or https")]
    Scheme(String),
    #[error("URL has no host")]
    NoHost,
    #[error("URL must not carry credentials; put them in the endpoint's auth")]
    Credentials,
    #[error("host {0} is in a private, loopback or link-local range")]
    Restricted(String),
    #[error("invalid allow-list entry \"{0}\"")]
    AllowList(String),
}

/// Parsed `ihub.allow_private_hosts`: host names and CIDR ranges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AllowList {
    names: Vec<String>,
    nets: Vec<IpNet>,
}

impl AllowList {
    /// Comma-separated names, addresses or CIDR ranges; `*` allows everything.
    pub fn parse(text: &str) -> Result<AllowList, TargetError> {
        let mut list = AllowList::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                list.nets.push("0.0.0.0/0".parse().unwrap());
                list.nets.push("::/0".parse().unwrap());
            } else if let Ok(net) = item.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else if item.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
                list.names.push(item.to_ascii_lowercase());
            } else {
                return Err(TargetError::AllowList(item.to_string()));
            }
        }
        Ok(list)
    }

    /// Whether the address may be connected to: it is not restricted, or
    /// an entry of its own family covers it; an IPv6 address that embeds an
    /// IPv4 address also needs that IPv4 address allowed (see the module doc).
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => !restricted_v4(v4) || self.covers(ip),
            IpAddr::V6(v6) => {
                (!restricted_v6(v6) || self.covers(ip))
                    && embedded_ipv4(v6).is_none_or(|v4| self.allows_ip(IpAddr::V4(v4)))
            }
        }
    }

    /// An entry contains the address (`IpNet` never matches across families).
    fn covers(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip))
    }

    pub fn allows_name(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Whether the address is refused when nothing is allow-listed: loopback,
/// private (RFC 1918, ULA), link-local, site-local, CGNAT, unspecified,
/// broadcast, multicast and documentation addresses, and IPv6 addresses that
/// embed such an IPv4 address or cannot be judged (Teredo, local-use NAT64).
pub fn is_restricted(ip: IpAddr) -> bool {
    !AllowList::default().allows_ip(ip)
}

fn restricted_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || (o[0] == 100 && (64..128).contains(&o[1]))
        || o[0] == 0
}

/// The IPv6 address itself, not counting an IPv4 address it embeds.
fn restricted_v6(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        // fc00::/7 unique local, fe80::/10 link-local, fec0::/10 site-local
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        // 2001:db8::/32 and 3fff::/20 documentation
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] & 0xfff0) == 0x3ff0
        // 2001::/32 Teredo: tunnels to an IPv4 client through a relay
        || (s[0] == 0x2001 && s[1] == 0)
        // 64:ff9b:1::/48 local-use NAT64: a translator inside some network
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
        // 100::/64 discard-only
        || (s[0] == 0x100 && s[1..4] == [0, 0, 0])
}

/// The IPv4 address an IPv6 address carries, where a connection to it ends
/// up at that IPv4 address (the kernel for mapped and compatible addresses,
/// a translator or relay for the others).
pub fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = || Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32);
    match s {
        // ::ffff:a.b.c.d IPv4-mapped
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low()),
        // ::ffff:0:a.b.c.d IPv4-translated (SIIT)
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low()),
        // ::a.b.c.d IPv4-compatible, but not :: and ::1 themselves
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => Some(low()),
        // 64:ff9b::a.b.c.d well-known NAT64 prefix
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low()),
        // 2002:aabb:ccdd::/48 6to4
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from(((hi as u32) << 16) | lo as u32)),
        _ => None,
    }
}

/// Checks an endpoint URL: http(s), a host, no credentials, and a host that
/// is not a restricted address (names are checked again after DNS, at send time).
pub fn check_url(raw: &str, allow: &AllowList) -> Result<Url, TargetError> {
    let url = Url::parse(raw).map_err(|_| TargetError::Unparsable(raw.chars().take(200).collect()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::Scheme(url.scheme().to_string()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::Credentials);
    }
    match url.host() {
        None => return Err(TargetError::NoHost),
        Some(Host::Ipv4(ip)) => check_ip(IpAddr::V4(ip), allow)?,
        Some(Host::Ipv6(ip)) => check_ip(IpAddr::V6(ip), allow)?,
        Some(Host::Domain(name)) => {
            let lower = name.to_ascii_lowercase();
            let local = lower == "localhost" || lower.ends_with(".localhost");
            if local && !allow.allows_name(&lower) && !allow.allows_ip(IpAddr::from([127, 0, 0, 1])) {
                return Err(TargetError::Restricted(lower));
            }
        }
    }
    Ok(url)
}

fn check_ip(ip: IpAddr, allow: &AllowList) -> Result<(), TargetError> {
    if allow.allows_ip(ip) {
        Ok(())
    } else {
        Err(TargetError::Restricted(ip.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> AllowList {
        AllowList::default()
    }

    #[test]
    fn public_urls_pass() {
        assert!(check_url("https://hooks.example.com/in?x=1", &none()).is_ok());
        assert!(check_url("http://93.184.216.34:8080/", &none()).is_ok());
    }

    #[test]
    fn bad_urls_are_named() {
        assert!(matches!(check_url("not a url", &none()), Err(TargetError::Unparsable(_))));
        assert_eq!(check_url("ftp://example.com/", &none()), Err(TargetError::Scheme("ftp".into())));
        assert_eq!(check_url("https://u:p@example.com/", &none()), Err(TargetError::Credentials));
        assert!(matches!(check_url("file:///etc/passwd", &none()), Err(TargetError::Scheme(_))));
    }

    #[test]
    fn private_ranges_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:9000/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:8080/",
        ] {
            assert!(matches!(check_url(url, &none()), Err(TargetError::Restricted(_))), "{url}");
        }
        let allow = AllowList::parse("127.0.0.0/8, ::1, localhost").unwrap();
        assert!(check_url("http://127.0.0.1:9000/", &allow).is_ok());
        assert!(check_url("http://[::1]/", &allow).is_ok());
        assert!(check_url("http://localhost:8080/", &allow).is_ok());
        assert!(check_url("http://10.1.2.3/", &allow).is_err());
    }

    fn refused(url: &str, allow: &AllowList) -> bool {
        matches!(check_url(url, allow), Err(TargetError::Restricted(_)))
    }

    #[test]
    fn ipv4_embedded_in_ipv6_is_judged_as_ipv4() {
        for url in [
            // IPv4-compatible
            "http://[::127.0.0.1]/",
            "http://[::7f00:1]/",
            "http://[::10.0.0.1]/",
            "http://[::2]/",
            // IPv4-mapped
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::ffff:10.1.2.3]/",
            "http://[::ffff:100.64.0.1]/",
            "http://[::ffff:0.0.0.0]/",
            "http://[::ffff:255.255.255.255]/",
            "http://[::ffff:224.0.0.1]/",
            "http://[::ffff:192.0.2.1]/",
            // SIIT
            "http://[::ffff:0:127.0.0.1]/",
            "http://[::ffff:0:7f00:1]/",
            "http://[::ffff:0:a9fe:a9fe]/",
            // NAT64, well-known prefix
            "http://[64:ff9b::127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[64:ff9b::c0a8:101]/",
            // 6to4
            "http://[2002:7f00:1::1]/",
            "http://[2002:a9fe:a9fe::]/",
            "http://[2002:c0a8:0101:1::1]/",
        ] {
            assert!(refused(url, &none()), "{url}");
        }
        for url in [
            "http://[::8.8.8.8]/",
            "http://[::ffff:8.8.8.8]/",
            "http://[::ffff:0:8.8.8.8]/",
            "http://[64:ff9b::8.8.8.8]/",
            "http://[2002:808:808::1]/",
            "http://[2606:4700:4700::1111]/",
        ] {
            assert!(check_url(url, &none()).is_ok(), "{url}");
        }
    }

    #[test]
    fn ipv6_ranges_refused_outright() {
        for url in [
            "http://[::]/",
            "http://[::1]/",
            "http://[fc00::1]/",
            "http://[fd12:3456::1]/",
            "http://[fe80::1]/",
            "http://[fec0::1]/",
            "http://[feff:ffff::1]/",
            "http://[ff02::1]/",
            "http://[2001:db8::1]/",
            "http://[3fff::1]/",
            "http://[100::1]/",
            // Teredo, whatever client it names (here 8.8.8.8 xor-ed)
            "http://[2001:0:4136:e378:8000:63bf:f7f7:f7f7]/",
            "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
            // local-use NAT64, with a public or a loopback IPv4 in any place
            "http://[64:ff9b:1::808:808]/",
            "http://[64:ff9b:1:7f00:1::]/",
        ] {
            assert!(refused(url, &none()), "{url}");
        }
    }

    #[test]
    fn embedded_ipv4_needs_an_ipv4_entry() {
        let allow = AllowList::parse("127.0.0.0/8, ::1, localhost").unwrap();
        for url in [
            "http://[::1]/",
            "http://[::127.0.0.1]/",
            "http://[::7f00:1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:0:7f00:1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::1]/",
        ] {
            assert!(check_url(url, &allow).is_ok(), "{url}");
        }
        for url in [
            "http://[::ffff:10.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[2002:a00:1::1]/",
            "http://[fd00::1]/",
            "http://[fec0::1]/",
            "http://[64:ff9b:1::7f00:1]/",
            "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
        ] {
            assert!(refused(url, &allow), "{url}");
        }
        // An IPv6 entry allows the IPv6 address, never the IPv4 one inside it.
        let v6_only = AllowList::parse("::ffff:127.0.0.1, ::ffff:0:0/96, 64:ff9b::/96, 2002::/16").unwrap();
        for url in ["http://[::ffff:127.0.0.1]/", "http://[::ffff:0:7f00:1]/", "http://[64:ff9b::7f00:1]/"] {
            assert!(refused(url, &v6_only), "{url}");
        }
        assert!(refused("http://[2002:7f00:1::1]/", &v6_only));
        // Ranges refused outright are allowed by an IPv6 entry covering them.
        let v6 = AllowList::parse("fec0::/10, 2001::/32, 64:ff9b:1::/48").unwrap();
        assert!(check_url("http://[fec0::1]/", &v6).is_ok());
        assert!(check_url("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", &v6).is_ok());
        assert!(check_url("http://[64:ff9b:1::808:808]/", &v6).is_ok());
        let star = AllowList::parse("*").unwrap();
        for url in ["http://[::ffff:127.0.0.1]/", "http://[2001:0:1::1]/", "http://[fec0::1]/"] {
            assert!(check_url(url, &star).is_ok(), "{url}");
        }
    }

    #[test]
    fn embedded_ipv4_is_extracted_from_each_form() {
        let v4 = |s: &str| embedded_ipv4(s.parse().unwrap());
        let lo = Some(Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(v4("::127.0.0.1"), lo);
        assert_eq!(v4("::7f00:1"), lo);
        assert_eq!(v4("::ffff:127.0.0.1"), lo);
        assert_eq!(v4("::ffff:0:7f00:1"), lo);
        assert_eq!(v4("64:ff9b::7f00:1"), lo);
        assert_eq!(v4("2002:7f00:1:2:3:4:5:6"), lo);
        assert_eq!(v4("::"), None);
        assert_eq!(v4("::1"), None);
        assert_eq!(v4("2606:4700::1"), None);
        // As the resolver guard sees addresses: the same rules.
        let none = none();
        for ip in ["::ffff:127.0.0.1", "::ffff:0:7f00:1", "64:ff9b::a9fe:a9fe", "2002:a00:1::", "fec0::1", "2001::1"] {
            assert!(!none.allows_ip(ip.parse().unwrap()), "{ip}");
            assert!(is_restricted(ip.parse().unwrap()), "{ip}");
        }
        assert!(none.allows_ip("::ffff:8.8.8.8".parse().unwrap()));
        assert!(!is_restricted("2002:808:808::".parse().unwrap()));
    }

    #[test]
    fn allow_list_parses_names_addresses_ranges_and_star() {
        let a = AllowList::parse(" 10.0.0.0/8 ,192.168.1.5, internal.example ").unwrap();
        assert!(a.allows_ip("10.9.9.9".parse().unwrap()));
        assert!(a.allows_ip("192.168.1.5".parse().unwrap()));
        assert!(!a.allows_ip("192.168.1.6".parse().unwrap()));
        assert!(a.allows_name("Internal.Example"));
        let star = AllowList::parse("*").unwrap();
        assert!(star.allows_ip("127.0.0.1".parse().unwrap()));
        assert!(AllowList::parse("10.0.0.0/33").is_err());
        assert!(AllowList::parse("bad host!").is_err());
    }
}
