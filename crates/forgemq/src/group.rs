//! Fair groups: within a topic, messages published with a group
//! ([`PublishOptions::group`](crate::PublishOptions::group)) wait in their group's own list,
//! and workers take from the groups in turn (weighted round robin, in `lua/fetch.lua`), so
//! one tenant's burst does not delay the others. Per group: the most messages handled at
//! once, a weight, and a pause.

use serde::Serialize;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::validate_topic;

/// Longest group name in bytes.
pub const MAX_GROUP_NAME: usize = 200;

/// Highest weight a group may have.
pub const MAX_GROUP_WEIGHT: u32 = 1000;

/// Checks a group name: 1-200 bytes, no spaces or control characters (the id rules).
pub(crate) fn check_group_name(group: &str) -> Result<()> {
    let reason = if group.is_empty() {
        "it is empty"
    } else if group.len() > MAX_GROUP_NAME {
        "it is longer than 200 bytes"
    } else if group.chars().any(|c| c.is_control() || c.is_whitespace()) {
        "spaces and control characters are not allowed"
    } else {
        return Ok(());
    };
    Err(Error::Config(format!(
        "invalid group name {group:?}: {reason}"
    )))
}

/// How workers treat one group of a topic. The default: no cap, weight 1, not paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupSettings {
    /// Most messages of the group handled at once, across every worker (0: no cap).
    pub max_active: u32,
    /// How many messages the group gives per turn of the round robin (1-1000): a group of
    /// weight 2 gets twice the share of a group of weight 1 while both have work.
    pub weight: u32,
    /// A paused group's messages wait; the other groups go on.
    pub paused: bool,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            max_active: 0,
            weight: 1,
            paused: false,
        }
    }
}

impl GroupSettings {
    /// No cap, weight 1, not paused.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `n` messages of the group handled at once (0: no cap).
    pub fn max_active(mut self, n: u32) -> Self {
        self.max_active = n;
        self
    }

    /// The group's weight, 1-1000.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Paused or not.
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    fn check(&self) -> Result<()> {
        if self.weight == 0 || self.weight > MAX_GROUP_WEIGHT {
            return Err(Error::Config(format!(
                "group weight {} is out of range: use 1-{MAX_GROUP_WEIGHT}",
                self.weight
            )));
        }
        Ok(())
    }

    /// As stored in the topic's `gconf` hash: `"<max_active> <weight> <paused>"`.
    fn encode(&self) -> String {
        format!(
            "{} {} {}",
            self.max_active,
            self.weight,
            u8::from(self.paused)
        )
    }

    pub(crate) fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let max_active = parts.next()?.parse().ok()?;
        let weight = parts.next()?.parse().ok()?;
        let paused = parts.next()? == "1";
        Some(Self {
            max_active,
            weight,
            paused,
        })
    }
}

/// One group of a topic, as [`Client::groups`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group's name.
    pub group: String,
    /// Its messages waiting to run (entries of cancelled ones included until a fetch
    /// passes them).
    pub pending: u64,
    /// Its messages being handled now.
    pub active: u64,
    /// Most handled at once (0: no cap).
    pub max_active: u32,
    /// Its weight in the round robin.
    pub weight: u32,
    /// Whether it is paused.
    pub paused: bool,
    /// Whether its settings were set ([`Client::set_group`]) rather than the defaults.
    pub configured: bool,
}

impl Client {
    /// Sets how workers treat group `group` of `topic`, for every worker at once and
    /// until changed or removed: most messages handled at once, weight, pause. On a
    /// partitioned topic the settings go to every partition; messages of one group go to one
    /// partition (the group picks it), so the cap holds for the whole topic.
    pub async fn set_group(&self, topic: &str, group: &str, settings: GroupSettings) -> Result<()> {
        validate_topic(topic)?;
        check_group_name(group)?;
        settings.check()?;
        let layout = self.fresh_layout(topic).await?;
        let value = settings.encode();
        for keys in &layout.partitions {
            self.store().set_group(keys, group, Some(&value)).await?;
        }
        self.register(topic).await
    }

    /// Removes the settings of group `group` of `topic` (it goes back to no cap, weight 1,
    /// not paused); whether it had any.
    pub async fn remove_group(&self, topic: &str, group: &str) -> Result<bool> {
        validate_topic(topic)?;
        check_group_name(group)?;
        let layout = self.fresh_layout(topic).await?;
        let mut had = false;
        for keys in &layout.partitions {
            had |= self.store().set_group(keys, group, None).await?;
        }
        Ok(had)
    }

    /// Pauses group `group` of `topic`: its messages wait, the other groups go on. Keeps
    /// its other settings.
    pub async fn pause_group(&self, topic: &str, group: &str) -> Result<()> {
        let settings = self.group_settings(topic, group).await?;
        self.set_group(topic, group, settings.paused(true)).await
    }

    /// Resumes a paused group.
    pub async fn resume_group(&self, topic: &str, group: &str) -> Result<()> {
        let settings = self.group_settings(topic, group).await?;
        self.set_group(topic, group, settings.paused(false)).await
    }

    /// The settings of group `group` of `topic` (the defaults when none were set).
    pub async fn group_settings(&self, topic: &str, group: &str) -> Result<GroupSettings> {
        validate_topic(topic)?;
        check_group_name(group)?;
        Ok(self
            .groups(topic)
            .await?
            .into_iter()
            .find(|g| g.group == group)
            .map(|g| GroupSettings {
                max_active: g.max_active,
                weight: g.weight,
                paused: g.paused,
            })
            .unwrap_or_default())
    }

    /// The groups of `topic` that have waiting or running messages or settings, sorted by
    /// name, summed over its partitions.
    pub async fn groups(&self, topic: &str) -> Result<Vec<GroupInfo>> {
        validate_topic(topic)?;
        let layout = self.layout(topic).await?;
        let mut all: std::collections::BTreeMap<String, GroupInfo> = Default::default();
        for keys in &layout.partitions {
            for (group, pending, active, conf) in self.store().groups(keys).await? {
                let settings = conf.as_deref().and_then(GroupSettings::decode);
                let entry = all.entry(group.clone()).or_insert_with(|| GroupInfo {
                    group,
                    pending: 0,
                    active: 0,
                    max_active: 0,
                    weight: 1,
                    paused: false,
                    configured: false,
                });
                entry.pending += pending;
                entry.active += active;
                if let Some(s) = settings {
                    entry.max_active = s.max_active;
                    entry.weight = s.weight;
                    entry.paused = s.paused;
                    entry.configured = true;
                }
            }
        }
        Ok(all.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_names_follow_the_id_rules() {
        let s = GroupSettings::new().max_active(5).weight(2).paused(true);
        assert_eq!(GroupSettings::decode(&s.encode()), Some(s));
        assert_eq!(GroupSettings::decode("x"), None);
        assert!(GroupSettings::new().weight(0).check().is_err());
        assert!(GroupSettings::new().weight(1001).check().is_err());
        assert!(check_group_name("tenant-42").is_ok());
        for bad in ["", "a b", "a\nb", &"x".repeat(201)] {
            assert!(check_group_name(bad).is_err(), "{bad:?}");
        }
    }
}
