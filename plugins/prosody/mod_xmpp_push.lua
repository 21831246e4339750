-- mod_xmpp_push: tells the xmpp-push component when a user's device needs waking.
--
-- The server side of the protocol `urn:xmpp-push:plugin:1` (docs/plugin-protocol.md in
-- the xmpp-push repository). The component keeps the push registrations; only the
-- server knows whether a session is offline, hibernated (XEP-0198 resumption pending)
-- or "undecided" (a stanza sent, no acknowledgement yet), so this module reports that
-- state over the component's XEP-0114 link as `<notify/>` IQs, and follows the knobs the
-- component sends in `<configure/>`.
--
-- Works with Prosody 0.12 (mod_smacks from prosody-modules) and 13.0 (mod_smacks in
-- core); without mod_smacks only offline notifications are sent.
--
-- Configuration, on the VirtualHost (or globally: components are skipped):
--     modules_enabled = { ...; "xmpp_push" }
--     xmpp_push_component = "push.example.org"
--
-- Copyright (C) the xmpp-push authors. MIT licensed.

local st = require "util.stanza";
local jid = require "util.jid";
local filters = require "util.filters";
local watchdog = require "util.watchdog";
local new_id = require "util.id".medium;
local time_now = require "util.time".now;

local os_time = os.time;
local math_max = math.max;
local pairs, ipairs, type, tostring, tonumber = pairs, ipairs, type, tostring, tonumber;

local xmlns_plugin = "urn:xmpp-push:plugin:1";
local xmlns_carbons = "urn:xmpp:carbons:2";
local xmlns_forward = "urn:xmpp:forward:0";
local xmlns_reference = "urn:xmpp:reference:0";

local PROTOCOL_VERSION = "1";
local NOTIFY_TIMEOUT = 30; -- seconds to wait for the component's answer before logging
-- Seconds a client gets to answer the ack request we send where mod_smacks sent none.
local ACK_GRACE = 1;
-- mod_smacks queues outgoing stanzas in a stanzas/out filter at priority -999; ours must
-- run after it (filters run from high to low priority), so that the stanza already has
-- its XEP-0198 sequence number when we note it.
local FILTER_PRIORITY = -1000;
-- Set on stanzas already reported, so that a stanza mod_smacks later hands to offline
-- storage (hibernation timed out) is not reported a second time.
local NOTIFIED = "_xmpp_push_notified";

if module:get_host_type() ~= "local" then
	-- Loaded through the global modules_enabled on a component or similar: nothing to
	-- watch here, user sessions live on VirtualHosts.
	module:log("debug", "Not a user host, mod_xmpp_push stays idle here");
	return;
end

local component_jid = module:get_option_string("xmpp_push_component");
if not component_jid then
	module:log("error", "xmpp_push_component is not set (e.g. xmpp_push_component = \"push.%s\"): "
		.. "mod_xmpp_push does nothing on this host", module.host);
	return;
end
component_jid = jid.prep(component_jid);
if not component_jid or jid.node(component_jid) or jid.resource(component_jid) then
	module:log("error", "xmpp_push_component = %q is not a component JID (a bare domain): "
		.. "mod_xmpp_push does nothing on this host", module:get_option_string("xmpp_push_component"));
	return;
end

local host_sessions = prosody.hosts[module.host].sessions;

-- The knobs (protocol §1). A `configure` states all of them; an attribute it leaves out
-- takes its default, so the component never has to know what an earlier one said.
local DEFAULT_KNOBS = {
	undecided_delay = 5000; -- ms
	hibernation_keepalive = 259200; -- s; 0 keeps mod_smacks' own timeout
	include_body = false;
	include_sender = true;
};

local function copy(t)
	local c = {};
	for k, v in pairs(t) do c[k] = v; end
	return c;
end

local knobs = copy(DEFAULT_KNOBS);

local function parse_whole_number(value)
	if not value:match("^%d+$") then return nil; end
	return tonumber(value);
end

local function parse_boolean(value)
	if value == "true" or value == "1" then return true; end
	if value == "false" or value == "0" then return false; end
	return nil;
end

local KNOB_ATTRIBUTES = {
	{ attribute = "undecided-delay"; key = "undecided_delay"; parse = parse_whole_number };
	{ attribute = "hibernation-keepalive"; key = "hibernation_keepalive"; parse = parse_whole_number };
	{ attribute = "include-body"; key = "include_body"; parse = parse_boolean };
	{ attribute = "include-sender"; key = "include_sender"; parse = parse_boolean };
};

-- The knobs a <configure/> element states, or nil and what is wrong with it.
local function parse_knobs(configure)
	local parsed = copy(DEFAULT_KNOBS);
	for _, knob in ipairs(KNOB_ATTRIBUTES) do
		local value = configure.attr[knob.attribute];
		if value ~= nil then
			local parsed_value = knob.parse(value);
			if parsed_value == nil then
				return nil, ("invalid %s=%q"):format(knob.attribute, value);
			end
			parsed[knob.key] = parsed_value;
		end
	end
	return parsed;
end

local function describe_knobs(k)
	return ("undecided-delay=%d ms, hibernation-keepalive=%d s, include-body=%s, include-sender=%s")
		:format(k.undecided_delay, k.hibernation_keepalive, tostring(k.include_body), tostring(k.include_sender));
end

local function apply_knobs(new_knobs, source)
	knobs = new_knobs;
	module:log("info", "Configured by %s (%s): %s", component_jid, source, describe_knobs(knobs));
end

-- Runs f(...) and logs instead of raising: this module hooks into stanza delivery, and a
-- bug here must cost a notification, never a message.
local function guarded(what, f, ...)
	local ok, err = pcall(f, ...);
	if not ok then
		module:log("error", "Error while %s (no notification sent): %s", what, tostring(err));
	end
	return ok;
end

-- What makes a stanza push-worthy (protocol §3) ------------------------------------------

-- Text of the first child `name` in the stanza's own namespace. Copies made by
-- mod_carbons carry xmlns='jabber:client' on the message but none on its children, so
-- neither form of "the same namespace" can be relied upon.
local function own_child_text(element, name)
	for _, child in ipairs(element.tags) do
		if child.name == name and (child.attr.xmlns == nil or child.attr.xmlns == "jabber:client") then
			return child:get_text();
		end
	end
	return nil;
end

-- { element, namespace, child it must have }: an OMEMO <encrypted/> without <payload/>
-- is key transport (session setup between devices), not a message for the user.
local ENCRYPTED_PAYLOADS = {
	{ "encrypted", "eu.siacs.conversations.axolotl", "payload" }; -- OMEMO (legacy, what apps send today)
	{ "encrypted", "urn:xmpp:omemo:0", "payload" };
	{ "encrypted", "urn:xmpp:omemo:1", "payload" };
	{ "encrypted", "urn:xmpp:omemo:2", "payload" };
	{ "x", "jabber:x:encrypted" }; -- XEP-0027 OpenPGP
	{ "openpgp", "urn:xmpp:openpgp:0" }; -- XEP-0373 OX
};

local CALL_PROPOSALS = { "urn:xmpp:jingle-message:0"; "urn:xmpp:jingle-message:1" }; -- XEP-0353

local function has_any(message, candidates)
	for _, candidate in ipairs(candidates) do
		local found = message:get_child(candidate[1], candidate[2]);
		if found and (not candidate[3] or found:get_child(candidate[3], candidate[2])) then
			return true;
		end
	end
	return false;
end

local function is_mam_result(stanza)
	for _, child in ipairs(stanza.tags) do
		if child.name == "result" and type(child.attr.xmlns) == "string"
			and child.attr.xmlns:sub(1, 13) == "urn:xmpp:mam:" then
			return true;
		end
	end
	return false;
end

-- Whether a groupchat message names the user: an XEP-0372 mention of their JID (or of
-- an occupant whose nick is their local part), or their local part in the body.
local function mentions(message, body, username)
	local user_bare = jid.join(username, module.host);
	local local_part = username:lower();
	for reference in message:childtags("reference", xmlns_reference) do
		local uri = reference.attr.uri;
		if reference.attr.type == "mention" and type(uri) == "string" then
			local target = jid.prep(uri:match("^xmpp:([^?#]+)") or "");
			if target then
				local _, _, nick = jid.split(target);
				if jid.bare(target) == user_bare or (nick and nick:lower() == local_part) then
					return true;
				end
			end
		end
	end
	return body ~= nil and body:lower():find(local_part, 1, true) ~= nil;
end

-- A summary of `stanza` for a `notify` to `username`, or nil if it is not push-worthy.
local function summarize(stanza, username)
	if not st.is_stanza(stanza) or stanza.name ~= "message" then return nil; end
	if stanza:get_child("sent", xmlns_carbons) then return nil; end -- the user's own message
	if is_mam_result(stanza) then return nil; end -- history the client asked for
	local message = stanza;
	local received = stanza:get_child("received", xmlns_carbons);
	if received then
		-- A copy of a message to another of the user's devices: the original decides.
		local forwarded = received:get_child("forwarded", xmlns_forward);
		message = forwarded and forwarded:get_child("message", "jabber:client");
		if not message then return nil; end
	end
	local message_type = message.attr.type or "normal";
	if message_type == "error" or message_type == "headline" then return nil; end
	local body = own_child_text(message, "body");
	if body == "" then body = nil; end
	local encrypted = has_any(message, ENCRYPTED_PAYLOADS);
	local call = false;
	for _, xmlns in ipairs(CALL_PROPOSALS) do
		if message:get_child("propose", xmlns) then call = true; end
	end
	-- Chat states, receipts and markers alone would wake a phone to show nothing.
	if not (body or encrypted or call) then return nil; end
	return {
		sender = message.attr.from;
		type = message_type;
		body = body;
		encrypted = encrypted;
		call = call;
		mention = message_type == "groupchat" and mentions(message, body, username);
	};
end

-- One notify stands for several stanzas: describe the one that matters most (a call,
-- else a mention, else the latest), with `count` telling how many there were.
local function representative(summaries)
	for i = #summaries, 1, -1 do
		if summaries[i].call then return summaries[i]; end
	end
	for i = #summaries, 1, -1 do
		if summaries[i].mention then return summaries[i]; end
	end
	return summaries[#summaries];
end

-- Talking to the component --------------------------------------------------------------

local function boolean_attribute(value)
	return value and "true" or "false";
end

local function log_refusal(user, state, err)
	-- A notification is worth something only now: log, never retry (protocol §3).
	local condition = err and err.condition or "unknown";
	-- mod_component answers remote-server-timeout (and logs it) while the component is
	-- not connected: expected during its restarts, not worth a warning of our own.
	local level = condition == "remote-server-timeout" and "info" or "warn";
	module:log(level, "Component %s did not take the %s notification for %s: %s%s", component_jid, state, user,
		condition, err and err.text and (" (" .. tostring(err.text) .. ")") or "");
end

local function send_notify(username, state, resource, summary, count)
	local user = jid.join(username, module.host);
	local notify = st.iq({ type = "set"; from = module.host; to = component_jid; id = new_id() })
		:tag("notify", {
			xmlns = xmlns_plugin;
			user = user;
			resource = resource;
			state = state;
			count = tostring(count);
			sender = knobs.include_sender and summary.sender or nil;
			type = summary.type;
			encrypted = boolean_attribute(summary.encrypted);
			call = boolean_attribute(summary.call);
			mention = boolean_attribute(summary.mention);
		});
	-- An encrypted message's body is only a fallback text ("I sent you an OMEMO
	-- message"), never the content: not worth showing, as the component agrees.
	if knobs.include_body and summary.body and not summary.encrypted then
		notify:text_tag("body", summary.body);
	end
	module:log("debug", "Notifying %s: %s %s%s, count %d", component_jid, state, user,
		resource and ("/" .. resource) or "", count);
	module:send_iq(notify, nil, NOTIFY_TIMEOUT):next(function (answer)
		-- module:send_iq resolves with errors bounced through the sending origin too.
		local reply = answer and answer.stanza;
		if reply and reply.attr.type == "error" then
			local error_type, condition, text = reply:get_error();
			log_refusal(user, state, { type = error_type; condition = condition; text = text });
		end
	end, function (err)
		log_refusal(user, state, err);
	end);
end

-- Asks the component for the knobs; it sends `configure` itself whenever it connects,
-- so this only matters when the module is (re)loaded while the component is up.
local function ask_for_configure()
	local get = st.iq({ type = "get"; from = module.host; to = component_jid; id = new_id() })
		:tag("configure", { xmlns = xmlns_plugin });
	module:send_iq(get, nil, NOTIFY_TIMEOUT):next(function (answer)
		local reply = answer and answer.stanza;
		if not reply or reply.attr.type ~= "result" then
			module:log("debug", "Component %s is not connected; it sends configure when it connects", component_jid);
			return;
		end
		local configure = reply:get_child("configure", xmlns_plugin);
		if not configure then
			module:log("warn", "Component %s answered configure without <configure/>; keeping %s",
				component_jid, describe_knobs(knobs));
			return;
		end
		local answered, err = parse_knobs(configure);
		if not answered then
			module:log("warn", "Component %s answered an unusable configure (%s); keeping %s",
				component_jid, err, describe_knobs(knobs));
			return;
		end
		apply_knobs(answered, "answer to our configure get");
	end, function (err)
		module:log("debug", "No configure from %s (%s); it sends configure when it connects",
			component_jid, err and err.condition or "no answer");
	end);
end

-- Where mod_smacks keeps its counters ---------------------------------------------------

-- The XEP-0198 position of a session's outgoing stream: how many stanzas the client
-- acknowledged, and how many were queued in all (the sequence number of the last one).
-- util.smqueue (0.12 prosody-modules, 13.0) counts for us; older mod_smacks kept an
-- array of the unacknowledged stanzas and the acknowledged count on the session.
local function stream_position(session)
	local queue = session.outgoing_stanza_queue;
	if type(queue) ~= "table" then return nil; end
	if type(queue.count_acked) == "function" and type(queue.count_unacked) == "function" then
		local acked = queue:count_acked();
		return acked, acked + queue:count_unacked();
	end
	local acked = session.last_acknowledged_stanza;
	if type(acked) == "number" then
		return acked, acked + #queue;
	end
	return nil;
end

-- The stanzas of a smacks event's `queue`: the array mod_smacks passes (queue:table()),
-- or, defensively, the queue object itself.
local function queued_stanzas(queue)
	if type(queue) ~= "table" then return {}; end
	if type(queue.table) == "function" then return queue:table(); end
	return queue;
end

-- Session state -------------------------------------------------------------------------
--
-- session.xmpp_push = {
--     armed = true,
--     pending = { { seq = n, sent_at = t, summary = {...} }, ... },
--         push-worthy stanzas sent on the live stream, oldest first, not known to be acked
--     undecided = bool,   -- reported undecided; until an ack covers `pending`, each new
--                         -- push-worthy stanza is reported at once
--     timer = handle,     -- fires when the oldest pending stanza reaches undecided-delay
--     asked = bool,       -- we sent <r/> ourselves for the pending stanzas
--     saved_watchdog = { callback, timeout, since },  -- mod_smacks' own, while ours runs
-- }
-- It lives in the session, so it survives XEP-0198 resumption (the same session object
-- goes on) and ends with the session, as the protocol wants of arming.

local function forget_pending(state)
	if state.timer then
		state.timer:stop();
		state.timer = nil;
	end
	state.pending = {};
	state.undecided = false;
	state.asked = nil;
end

local function drop_acknowledged(state, acked)
	local pending = state.pending;
	local first = 1;
	while pending[first] and pending[first].seq <= acked do
		first = first + 1;
	end
	if first > 1 then
		local rest = {};
		for i = first, #pending do rest[#rest + 1] = pending[i]; end
		state.pending = rest;
	end
end

local check_undecided;

local function schedule_check(session, state, delay)
	state.timer = module:add_timer(delay, function ()
		guarded("checking for unacknowledged stanzas", check_undecided, session);
	end);
end

function check_undecided(session)
	local state = session.xmpp_push;
	if not state then return; end
	state.timer = nil;
	if not state.armed or session.destroyed or session.hibernating or not session.smacks then return; end
	local acked = stream_position(session);
	if not acked then return; end
	drop_acknowledged(state, acked);
	local oldest = state.pending[1];
	if not oldest then return; end
	local due_in = oldest.sent_at + knobs.undecided_delay / 1000 - time_now();
	if due_in > 0.001 then
		-- The stanza this timer was for has been acknowledged; a later one has not yet
		-- had its full delay.
		schedule_check(session, state, due_in);
		return;
	end
	if not session.awaiting_ack and not state.asked then
		-- mod_smacks asks for an acknowledgement after every stanza by default, but not
		-- when told to wait for more (smacks_max_unacked_stanzas) or for an inactive
		-- client without a CSI module that flushes (smacks_max_inactive_unacked_stanzas).
		-- A client never asked never acknowledges: ask, and judge a moment later.
		-- (No session.awaiting_ack here: that is mod_smacks' own bookkeeping.)
		state.asked = true;
		session.send(st.stanza("r", { xmlns = session.smacks }));
		schedule_check(session, state, ACK_GRACE);
		return;
	end
	state.asked = nil;
	state.undecided = true;
	local summaries = {};
	for i, entry in ipairs(state.pending) do summaries[i] = entry.summary; end
	send_notify(session.username, "undecided", session.resource, representative(summaries), #summaries);
end

-- stanzas/out filter of armed sessions: notes every push-worthy stanza sent on the live
-- stream, to see later whether the client acknowledged it in time.
local function note_sent(session, state, stanza)
	if stanza.name ~= "message" or (stanza.attr.xmlns and stanza.attr.xmlns ~= "jabber:client") then return; end
	local summary = summarize(stanza, session.username);
	if not summary then return; end
	local acked, seq = stream_position(session);
	if not acked then return; end
	drop_acknowledged(state, acked);
	local pending = state.pending;
	if state.undecided then
		if pending[1] then
			-- Still nothing acknowledged since we reported the session undecided: the
			-- device is known to be asleep, so waiting again would only delay the push.
			pending[#pending + 1] = { seq = seq; sent_at = time_now(); summary = summary };
			send_notify(session.username, "undecided", session.resource, summary, 1);
			return;
		end
		state.undecided = false; -- an acknowledgement covered everything reported
	end
	if not pending[1] then state.asked = nil; end -- a new round: nobody asked about it yet
	pending[#pending + 1] = { seq = seq; sent_at = time_now(); summary = summary };
	if not state.timer then
		schedule_check(session, state, knobs.undecided_delay / 1000);
	end
end

local function outgoing_filter(stanza, session)
	-- 0.12's mod_smacks replays the unacknowledged queue on resumption with this flag
	-- set, without counting the stanzas again.
	if session.resending_unacked then return stanza; end
	local state = session.xmpp_push;
	if state and state.armed and session.smacks and not session.hibernating and st.is_stanza(stanza) then
		guarded("noting a sent stanza", note_sent, session, state, stanza);
	end
	return stanza;
end

-- Hibernation keepalive -----------------------------------------------------------------
--
-- mod_smacks ends a hibernated session when session.hibernating_watchdog fires. While
-- the session is armed, ours replaces it for `hibernation-keepalive` seconds and, when it
-- fires, calls mod_smacks' callback, which then does exactly what it would have done.
-- 13.0's callback ignores a watchdog other than session.hibernating_watchdog, so ours is
-- passed through (it is that one).

local function extend_hibernation(session, state)
	local keepalive = knobs.hibernation_keepalive;
	local smacks_watchdog = session.hibernating_watchdog;
	if keepalive <= 0 or state.saved_watchdog or type(smacks_watchdog) ~= "table" then return; end
	local callback, timeout = smacks_watchdog.callback, smacks_watchdog.timeout;
	if type(callback) ~= "function" or type(smacks_watchdog.cancel) ~= "function" then
		session.log("warn", "mod_xmpp_push: unknown kind of hibernation watchdog, keeping mod_smacks' timeout");
		return;
	end
	smacks_watchdog:cancel();
	state.saved_watchdog = { callback = callback; timeout = timeout; since = session.hibernating or os_time() };
	session.hibernating_watchdog = watchdog.new(keepalive, function (this_watchdog)
		session.log("debug", "mod_xmpp_push: hibernation keepalive over, handing back to mod_smacks");
		state.saved_watchdog = nil;
		return callback(this_watchdog);
	end);
	session.log("debug", "mod_xmpp_push: armed session stays resumable for %d s", keepalive);
end

-- Puts mod_smacks' own timeout back (disarm, unload), counted from the hibernation's start.
local function restore_hibernation(session, state)
	local saved = state.saved_watchdog;
	if not saved then return; end
	state.saved_watchdog = nil;
	if session.hibernating_watchdog then
		session.hibernating_watchdog:cancel();
		session.hibernating_watchdog = nil;
	end
	if not session.hibernating or session.destroyed then return; end
	local left = 0;
	if type(saved.timeout) == "number" then
		left = math_max(saved.timeout - (os_time() - saved.since), 0);
	end
	session.hibernating_watchdog = watchdog.new(left, saved.callback);
end

-- Arming (protocol §2) ------------------------------------------------------------------

local function watch(session, state)
	filters.add_filter(session, "stanzas/out", outgoing_filter, FILTER_PRIORITY);
	if session.hibernating then
		extend_hibernation(session, state);
	end
end

local function arm(session)
	local state = session.xmpp_push;
	if not state then
		state = { pending = {} };
		session.xmpp_push = state;
	end
	state.armed = true;
	watch(session, state);
end

local function disarm(session)
	local state = session.xmpp_push;
	if not state then return; end
	session.xmpp_push = nil;
	state.armed = false;
	forget_pending(state);
	filters.remove_filter(session, "stanzas/out", outgoing_filter);
	restore_hibernation(session, state);
end

local function each_session(f)
	for _, user in pairs(host_sessions) do
		for _, session in pairs(user.sessions or {}) do
			f(session);
		end
	end
end

-- IQs from the component ----------------------------------------------------------------

local function plugin_element()
	return st.stanza("plugin", {
		xmlns = xmlns_plugin;
		version = PROTOCOL_VERSION;
		name = "mod_xmpp_push";
		server = "Prosody " .. tostring(prosody.version or "unknown");
	});
end

local function handle_configure(origin, stanza, request)
	local configured, err = parse_knobs(request);
	if not configured then
		origin.send(st.error_reply(stanza, "modify", "bad-request", err));
		return;
	end
	apply_knobs(configured, "configure");
	origin.send(st.reply(stanza):add_child(plugin_element()));
end

-- The session(s) an arm/disarm names, or nil and why the JID is unusable. A session that
-- is gone is not an error: arming is a hint (protocol §2).
local function sessions_named(address, full_only)
	local node, host, resource = jid.prepped_split(address or "");
	if not node or host ~= module.host then
		return nil, "jid must be a user of " .. module.host;
	end
	if full_only and not resource then
		return nil, "jid must be a full JID";
	end
	local user = host_sessions[node];
	local found = {};
	if user and user.sessions then
		if resource then
			found[1] = user.sessions[resource];
		else
			for _, session in pairs(user.sessions) do found[#found + 1] = session; end
		end
	end
	return found;
end

local function handle_arm(origin, stanza, request)
	local found, err = sessions_named(request.attr.jid, true);
	if not found then
		origin.send(st.error_reply(stanza, "modify", "bad-request", err));
		return;
	end
	for _, session in ipairs(found) do
		arm(session);
		session.log("debug", "mod_xmpp_push: armed by %s", component_jid);
	end
	origin.send(st.reply(stanza));
end

local function handle_disarm(origin, stanza, request)
	local found, err = sessions_named(request.attr.jid, false);
	if not found then
		origin.send(st.error_reply(stanza, "modify", "bad-request", err));
		return;
	end
	for _, session in ipairs(found) do
		disarm(session);
		session.log("debug", "mod_xmpp_push: disarmed by %s", component_jid);
	end
	origin.send(st.reply(stanza));
end

local function component_request(name, handler)
	module:hook("iq-set/host/" .. xmlns_plugin .. ":" .. name, function (event)
		local origin, stanza = event.origin, event.stanza;
		local from = stanza.attr.from and jid.prep(jid.bare(stanza.attr.from));
		if from ~= component_jid then
			module:log("debug", "Refusing %s from %s: only %s may send it", name, tostring(stanza.attr.from), component_jid);
			origin.send(st.error_reply(stanza, "auth", "forbidden"));
			return true;
		end
		if not guarded("handling " .. name, handler, origin, stanza, stanza.tags[1]) then
			origin.send(st.error_reply(stanza, "wait", "internal-server-error"));
		end
		return true;
	end);
end

component_request("configure", handle_configure);
component_request("arm", handle_arm);
component_request("disarm", handle_disarm);

-- What triggers a notify (protocol §3) ---------------------------------------------------

local function has_session_besides(username, origin)
	local user = host_sessions[username];
	for _, session in pairs(user and user.sessions or {}) do
		if session ~= origin then return true; end
	end
	return false;
end

-- offline: mod_message found no session to deliver to (or mod_smacks gave up on the
-- user's last, hibernated session), and the message goes to offline storage / the archive.
local function on_offline_message(event)
	local stanza = event.stanza;
	if stanza[NOTIFIED] then return; end -- already reported for the session that held it
	local username = event.username or jid.node(stanza.attr.to);
	if not username then return; end
	-- The origin is the session giving up its queue when mod_smacks re-routes it; any
	-- other session means the user is not offline (e.g. connected without presence).
	if has_session_besides(username, event.origin) then return; end
	local summary = summarize(stanza, username);
	if not summary then return; end
	stanza[NOTIFIED] = true;
	send_notify(username, "offline", nil, summary, 1);
end

-- hibernated: the connection of an armed session was lost with stanzas unacknowledged.
local function on_hibernation_start(event)
	local session = event.origin;
	local state = session.xmpp_push;
	if not (state and state.armed) then return; end
	forget_pending(state); -- hibernated now, no longer undecided
	extend_hibernation(session, state);
	local summaries = {};
	for _, stanza in ipairs(queued_stanzas(event.queue)) do
		local summary = summarize(stanza, session.username);
		if summary then
			summaries[#summaries + 1] = summary;
			stanza[NOTIFIED] = true;
		end
	end
	if summaries[1] then
		send_notify(session.username, "hibernated", session.resource, representative(summaries), #summaries);
	end
end

-- hibernated: a stanza for an armed session that is waiting for resumption.
local function on_hibernated_stanza(event)
	local session, stanza = event.origin, event.stanza;
	local state = session.xmpp_push;
	if not (state and state.armed) then return; end
	local summary = summarize(stanza, session.username);
	if not summary then return; end
	stanza[NOTIFIED] = true;
	send_notify(session.username, "hibernated", session.resource, summary, 1);
end

-- Resumed: the same session goes on, still armed, on a new connection.
local function on_hibernation_end(event)
	local session = event.resumed or event.origin;
	local state = session and session.xmpp_push;
	if not (state and state.armed) then return; end
	-- mod_smacks has cancelled the watchdog (ours) and dropped it.
	state.saved_watchdog = nil;
	-- The new connection came with new filters: watch its outgoing stanzas again.
	filters.add_filter(session, "stanzas/out", outgoing_filter, FILTER_PRIORITY);
	-- The stanzas mod_smacks just re-sent are unacknowledged on the live stream again;
	-- a client that resumes and freezes at once would otherwise never be reported.
	forget_pending(state);
	local acked = stream_position(session);
	if not acked then return; end
	local now = time_now();
	for i, stanza in ipairs(queued_stanzas(event.queue)) do
		local summary = summarize(stanza, session.username);
		if summary then
			state.pending[#state.pending + 1] = { seq = acked + i; sent_at = now; summary = summary };
		end
	end
	if state.pending[1] then
		schedule_check(session, state, knobs.undecided_delay / 1000);
	end
end

local function on_resource_unbind(event)
	local state = event.session and event.session.xmpp_push;
	if state then forget_pending(state); end
end

local function hook_guarded(event_name, handler, priority)
	module:hook(event_name, function (event)
		guarded("handling " .. event_name, handler, event);
		-- nil: never take the event from the modules that deliver or store the stanza
	end, priority);
end

-- Before mod_offline (-1), which stores the message and ends the event.
hook_guarded("message/offline/handle", on_offline_message, 1);
hook_guarded("smacks-hibernation-start", on_hibernation_start);
hook_guarded("smacks-hibernation-stanza-queued", on_hibernated_stanza);
hook_guarded("smacks-hibernation-end", on_hibernation_end);
hook_guarded("resource-unbind", on_resource_unbind);

-- Loading, reloading, unloading -------------------------------------------------------

function module.save()
	return { knobs = knobs };
end

function module.restore(data)
	if data and type(data.knobs) == "table" then
		knobs = data.knobs;
	end
end

function module.load()
	-- Armed sessions outlive a reload (the flag is in the session): watch them again.
	each_session(function (session)
		local state = session.xmpp_push;
		if state and state.armed then watch(session, state); end
	end);
	if prosody.start_time then
		-- Loaded into a running server: the component may be connected already and
		-- will not send configure again until it reconnects, so ask.
		module:add_timer(0, function () guarded("asking for configure", ask_for_configure); end);
	end
	-- At server start the component cannot be connected yet; it sends configure itself.
	module:log("info", "Reporting to %s (protocol %s)", component_jid, xmlns_plugin);
end

function module.unload()
	-- Leave the sessions as mod_smacks alone would have them.
	each_session(function (session)
		local state = session.xmpp_push;
		if state then
			filters.remove_filter(session, "stanzas/out", outgoing_filter);
			forget_pending(state);
			restore_hibernation(session, state);
		end
	end);
end
