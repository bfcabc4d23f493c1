//! The Lua scripts, one per state change, each prefixed with `lua/prelude.lua`.

use redis::Script;

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("../lua/prelude.lua"),
            "\n",
            include_str!(concat!("../lua/", $file))
        ))
    };
}

/// All scripts, hashed once. `EVALSHA` is used throughout; a `NOSCRIPT` reply (a restarted
/// Redis forgets its script cache) loads the script and tries again.
pub(crate) struct Scripts {
    pub(crate) publish: Script,
    pub(crate) fetch: Script,
    pub(crate) ack: Script,
    pub(crate) retry: Script,
    pub(crate) dead: Script,
    pub(crate) release: Script,
    pub(crate) extend: Script,
    pub(crate) recover: Script,
    pub(crate) reprocess: Script,
    pub(crate) purge: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            publish: script!("publish.lua"),
            fetch: script!("fetch.lua"),
            ack: script!("ack.lua"),
            retry: script!("retry.lua"),
            dead: script!("dead.lua"),
            release: script!("release.lua"),
            extend: script!("extend.lua"),
            recover: script!("recover.lua"),
            reprocess: script!("reprocess.lua"),
            purge: script!("purge.lua"),
        }
    }
}
