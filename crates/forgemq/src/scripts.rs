//! The Lua scripts, one per state change, each prefixed with `lua/prelude.lua`
//! (and the ones that store messages with `lua/store_messages.lua`).

use redis::Script;

macro_rules! script {
    ($($file:literal),+) => {
        Lua::new(concat!(
            include_str!("../lua/prelude.lua"),
            $("\n", include_str!(concat!("../lua/", $file))),+
        ))
    };
}

/// One script: its source (for `SCRIPT LOAD`) and its SHA1 (for `EVALSHA`).
pub(crate) struct Lua {
    script: Script,
    code: &'static str,
}

impl Lua {
    fn new(code: &'static str) -> Self {
        Self {
            script: Script::new(code),
            code,
        }
    }

    pub(crate) fn hash(&self) -> &str {
        self.script.get_hash()
    }

    pub(crate) fn code(&self) -> &'static str {
        self.code
    }
}

/// All scripts, hashed once. `EVALSHA` is used throughout; a `NOSCRIPT` reply (a restarted
/// Redis forgets its script cache) loads the script and tries again.
pub(crate) struct Scripts {
    pub(crate) publish: Lua,
    pub(crate) fetch: Lua,
    pub(crate) settle: Lua,
    pub(crate) release: Lua,
    pub(crate) extend: Lua,
    pub(crate) recover: Lua,
    pub(crate) reprocess: Lua,
    pub(crate) purge: Lua,
    pub(crate) cancel: Lua,
    pub(crate) resume: Lua,
    pub(crate) drop_dead: Lua,
    pub(crate) layout: Lua,
    pub(crate) heartbeat: Lua,
    pub(crate) consumers: Lua,
    pub(crate) schedule_fire: Lua,
    pub(crate) schedule_set: Lua,
    pub(crate) limit: Lua,
    pub(crate) progress: Lua,
    pub(crate) watch: Lua,
    pub(crate) group_set: Lua,
}

impl Scripts {
    /// Every script, for loading them all at connect time.
    pub(crate) fn all(&self) -> [&Lua; 20] {
        [
            &self.publish,
            &self.fetch,
            &self.settle,
            &self.cancel,
            &self.resume,
            &self.release,
            &self.extend,
            &self.recover,
            &self.reprocess,
            &self.purge,
            &self.drop_dead,
            &self.layout,
            &self.heartbeat,
            &self.consumers,
            &self.schedule_fire,
            &self.schedule_set,
            &self.limit,
            &self.progress,
            &self.watch,
            &self.group_set,
        ]
    }

    pub(crate) fn new() -> Self {
        Self {
            publish: script!("store_messages.lua", "publish.lua"),
            fetch: script!("fetch.lua"),
            settle: script!("settle.lua"),
            release: script!("release.lua"),
            extend: script!("extend.lua"),
            recover: script!("recover.lua"),
            reprocess: script!("reprocess.lua"),
            purge: script!("purge.lua"),
            cancel: script!("cancel.lua"),
            resume: script!("resume.lua"),
            drop_dead: script!("drop_dead.lua"),
            layout: script!("layout.lua"),
            heartbeat: script!("heartbeat.lua"),
            consumers: script!("consumers.lua"),
            schedule_fire: script!("store_messages.lua", "schedule_fire.lua"),
            schedule_set: script!("schedule_set.lua"),
            limit: script!("limit.lua"),
            progress: script!("progress.lua"),
            watch: script!("watch.lua"),
            group_set: script!("group_set.lua"),
        }
    }
}
