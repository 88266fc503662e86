//! Two objects that want one thing on SLIM: two Subscriptions that route the same name on the
//! same node over different links, or two SlimChannels that want the same channel on the same
//! channel manager. The oldest (creation time, then namespace/name) wins; the other writes
//! nothing and says who won, and takes over once the winner goes. Pure.

use std::collections::BTreeSet;

/// What one object claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Creation time (Unix seconds; the API server's resolution) and `namespace/name`: the order.
    pub created: i64,
    pub id: String,
    /// The SLIM name (route or channel).
    pub name: String,
    /// Where it is claimed: node endpoints, or the channel manager.
    pub places: BTreeSet<String>,
    /// How: the link (a Subscription's rendered link spec); equal ways share (two Subscriptions
    /// over one link are fine). Empty for channels: any two claims clash.
    pub how: String,
}

impl Claim {
    fn order(&self) -> (i64, &str) {
        (self.created, &self.id)
    }

    fn clashes_with(&self, other: &Claim) -> bool {
        self.id != other.id
            && self.name == other.name
            && (self.how.is_empty() || self.how != other.how)
            && !self.places.is_disjoint(&other.places)
    }
}

/// The oldest claim that clashes with `mine` and is older than it: the winner `mine` yields to.
pub fn winner<'a>(mine: &Claim, others: impl IntoIterator<Item = &'a Claim>) -> Option<&'a Claim> {
    others
        .into_iter()
        .filter(|o| mine.clashes_with(o) && o.order() < mine.order())
        .min_by(|a, b| a.order().cmp(&b.order()))
}

/// The condition message of a claim that lost to `winner`.
pub fn message(kind: &str, mine: &Claim, winner: &Claim) -> String {
    let shared: Vec<&str> = mine.places.intersection(&winner.places).map(String::as_str).collect();
    format!(
        "{kind} {} on {} is already claimed by {}, which is older and wins; this one writes nothing until that one is gone",
        mine.name,
        shared.join(", "),
        winner.id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(created: i64, id: &str, places: &[&str], how: &str) -> Claim {
        Claim {
            created,
            id: id.into(),
            name: "org/ns/bob".into(),
            places: places.iter().map(|p| p.to_string()).collect(),
            how: how.into(),
        }
    }

    #[test]
    fn the_oldest_wins_then_the_name_and_sharing_a_link_is_no_conflict() {
        let old = claim(10, "a/first", &["n1"], "link-b");
        let new = claim(20, "a/second", &["n1", "n2"], "link-c");
        let same_link = claim(30, "a/third", &["n1"], "link-b");
        let elsewhere = claim(5, "a/elsewhere", &["n9"], "link-c");
        let all = [old.clone(), new.clone(), same_link.clone(), elsewhere.clone()];
        assert_eq!(winner(&new, &all), Some(&old));
        assert_eq!(winner(&old, &all), None, "the oldest yields to nobody");
        assert_eq!(winner(&same_link, &all), Some(&new), "new is older than third and uses another link");
        assert_eq!(winner(&elsewhere, &all), None, "no shared node");
        // Same second: namespace/name decides.
        let tie = claim(10, "a/zeta", &["n1"], "link-z");
        assert_eq!(winner(&tie, &[old.clone(), tie.clone()]), Some(&old));
        assert!(message("route", &new, &old).contains("a/first") && message("route", &new, &old).contains("n1"));
    }

    #[test]
    fn channels_clash_on_the_same_manager_whatever_else() {
        let first = claim(1, "x/chat", &["http://cm:10356"], "");
        let second = claim(2, "y/chat", &["http://cm:10356"], "");
        let other_manager = claim(0, "z/chat", &["http://other:10356"], "");
        assert_eq!(winner(&second, &[first.clone(), second.clone(), other_manager.clone()]), Some(&first));
        assert_eq!(winner(&first, &[first.clone(), second, other_manager]), None);
    }
}
