-- mod_legate_mesh: the home node's half of the local side of Legate's intercluster mesh
-- (Prosody 0.12).
--
-- Several Legate clusters may serve one domain, each with its own home nodes and users. A
-- Prosody that serves that domain knows only its own accounts: without help it answers a
-- message to a colleague homed in another cluster with service-unavailable, and it cannot
-- take one from such a colleague (XEP-0114 components may only write from their own domain).
-- This module and one component close both gaps:
--
--   VirtualHost "example.com"
--       modules_enabled = { "legate_mesh" }       -- (with the host's other modules)
--       legate_mesh_component = "mesh.example.com"
--
--   Component "mesh.example.com"
--       component_secret = "..."                 -- the home node's component_secret in Legate
--       validate_from_addresses = false          -- it writes as users of other clusters
--
-- and in Legate's configuration `[[local_domain]] mesh_component = "mesh.example.com"`.
--
-- What a user of this host sends to an address of this domain that has no account here is
-- handed to the component: Legate forwards it to the cluster where that user lives (asking
-- the peer clusters first when nobody placed them), or answers with an error. What Legate
-- writes through the component from those users reaches ours like any stanza.

local jid_split = require "util.jid".split;
local user_exists = require "core.usermanager".user_exists;

local mesh = module:get_option_string("legate_mesh_component");
if not mesh then
	module:log("error", "legate_mesh_component is not set: the intercluster mesh is off on %s", module.host);
	return;
end

local handed = module:measure("handed", "counter");

local function hand_on(kind)
	return function (event)
		local origin, stanza = event.origin, event.stanza;
		-- Only what our own users send: never what came through a component (Legate's own
		-- components, the mesh included), so nothing loops.
		if origin.type == "component" then return; end
		local node, host = jid_split(stanza.attr.to);
		if not node or host ~= module.host or user_exists(node, host) then return; end
		local _, from_host = jid_split(stanza.attr.from);
		if from_host ~= module.host then return; end
		local component = prosody.hosts[mesh];
		if not component then
			module:log("warn", "component %s is not declared here: %s not handed on", mesh, stanza:top_tag());
			return;
		end
		handed();
		-- mod_component's handler writes it to Legate (or answers for it when Legate is not
		-- connected).
		return component.events.fire_event(stanza.name .. "/" .. kind, event);
	end
end

-- Before the host's own handlers (mod_message, mod_presence, mod_iq run at priority 0 or
-- below), for every stanza kind addressed to a user or one of their resources.
for _, name in ipairs({ "message", "presence", "iq" }) do
	for _, kind in ipairs({ "bare", "full" }) do
		module:hook(name .. "/" .. kind, hand_on(kind), 1000);
	end
end
