//! Talos's checks of a discovery service endpoint URL
//! (`cluster.discovery.registries.<name>.endpoint`), with its messages.
//!
//! Apart because it is a small URL parser of its own: it follows what Talos
//! accepts and rejects, not a general URL grammar.

/// Talos's checks of a discovery service endpoint URL, with its messages.
pub(super) fn check_endpoint_url(url: &str) -> Result<(), &'static str> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    if !["http", "https", "grpc"].contains(&scheme.to_ascii_lowercase().as_str()) {
        return Err("endpoint scheme must be http://, https:// or grpc://");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("endpoint has an unclosed '[' in its host")?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err("endpoint host in brackets must be an IPv6 address");
            }
            (host, after.strip_prefix(':'))
        }
        None => match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err("endpoint host is required");
    }
    if let Some(port) = port
        && !port.is_empty()
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err("endpoint port must be a number in 1..=65535");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_talos_accepts() {
        for url in [
            "https://discovery.talos.dev/",
            "http://localhost:3000",
            "grpc://10.0.0.1:3000",
            "https://[2001:470:6d:30e:565d:e162:e2a0:cf5a]:3456/",
            "HTTPS://user@host.example/path?q#f",
        ] {
            assert_eq!(check_endpoint_url(url), Ok(()), "{url}");
        }
        assert!(check_endpoint_url("https://[zz]/").is_err());
        assert!(check_endpoint_url("https://[::1/").is_err());
    }
}
