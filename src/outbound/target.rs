//! Which URLs an endpoint may point at. Private, loopback and link-local
//! addresses are refused unless allow-listed (`ihub.allow_private_hosts`): a
//! webhook URL is user input, and without this check it reaches the database
//! server's own network (cloud metadata at 169.254.169.254, say).

use std::net::IpAddr;

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

    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        !is_restricted(ip) || self.nets.iter().any(|n| n.contains(&ip))
    }

    pub fn allows_name(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Loopback, private (RFC 1918, ULA), link-local, CGNAT, unspecified and
/// multicast addresses, including IPv4 addresses mapped into IPv6.
pub fn is_restricted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_restricted(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
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
