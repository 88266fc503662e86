//! Where a channel manager runs in the cluster, from its endpoint. Pure.

/// The Pods behind a channel manager's endpoint, as its host names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManagerHost {
    /// A Pod IP (`http://10.1.2.3:10356`).
    PodIp(String),
    /// A Service (`name`, `name.ns`, `name.ns.svc`, `name.ns.svc.<cluster domain>`); a bare name
    /// is in the SlimChannel's namespace.
    Service { namespace: String, name: String },
}

/// The host of `endpoint` as a place in the cluster, or `None` (another host: outside the cluster).
pub fn manager_host(endpoint: &str, namespace: &str) -> Option<ManagerHost> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Some(ManagerHost::PodIp(host.to_owned()));
    }
    let labels: Vec<&str> = host.split('.').collect();
    let valid = |label: &&str| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !labels.iter().all(valid) {
        return None;
    }
    match labels.as_slice() {
        [name] => Some(ManagerHost::Service { namespace: namespace.to_owned(), name: (*name).to_owned() }),
        [name, ns] | [name, ns, "svc", ..] => {
            Some(ManagerHost::Service { namespace: (*ns).to_owned(), name: (*name).to_owned() })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: &str, name: &str) -> Option<ManagerHost> {
        Some(ManagerHost::Service { namespace: namespace.into(), name: name.into() })
    }

    #[test]
    fn endpoints_name_their_pods() {
        let cases = [
            ("http://10.1.2.3:10356", Some(ManagerHost::PodIp("10.1.2.3".into()))),
            ("https://[fd00::7]:10356", Some(ManagerHost::PodIp("fd00::7".into()))),
            ("http://slim-channel-manager:10356", service("team", "slim-channel-manager")),
            ("http://cm.slim:10356", service("slim", "cm")),
            ("http://cm.slim.svc:10356", service("slim", "cm")),
            ("http://cm.slim.svc.cluster.local:10356/", service("slim", "cm")),
            ("http://cm.example.com:10356", None),
            ("http://a.b.c:1", None),
            ("http://under_score:1", None),
            ("", None),
        ];
        for (endpoint, want) in cases {
            assert_eq!(manager_host(endpoint, "team"), want, "{endpoint}");
        }
    }
}
