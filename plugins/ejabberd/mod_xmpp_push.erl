%%%----------------------------------------------------------------------
%%% mod_xmpp_push: the ejabberd side of the xmpp-push plugin protocol
%%% (urn:xmpp-push:plugin:1, docs/plugin-protocol.md).
%%%
%%% The component (xmpp-push in direct mode) keeps the push registrations;
%%% this module tells it when a user needs waking: a push-worthy message for a
%%% user without a session (`offline`), for an armed session waiting for
%%% XEP-0198 resumption (`hibernated`), or for an armed live session that has
%%% not acknowledged it within `undecided-delay` (`undecided`).
%%%
%%% Written for ejabberd 23.01. Everything that runs in a c2s process is
%%% wrapped so that a fault here is logged and the session carries on.
%%%
%%% State kept in a c2s process (keys of its state map):
%%%   xmpp_push_armed        true while the component has armed the session
%%%   xmpp_push_timer        the undecided timer, while one runs
%%%   xmpp_push_reported     the mgmt sequence number of the newest stanza
%%%                          reported `undecided`; while it is unacknowledged,
%%%                          each further push-worthy stanza is reported at once
%%%   xmpp_push_timeout_orig the resumption timeout (ms) to restore after a
%%%                          hibernation that hibernation-keepalive stretched
%%%----------------------------------------------------------------------
-module(mod_xmpp_push).
-behaviour(gen_mod).

%% gen_mod callbacks
-export([start/2, stop/1, reload/3, depends/2, mod_opt_type/1, mod_options/1,
         mod_doc/0]).
%% gen_iq_handler callbacks
-export([process_iq/1, decode_iq_subel/1]).
%% hooks
-export([offline_message/1, c2s_handle_send/3, c2s_handle_info/2,
         c2s_handle_cast/2, c2s_session_pending/1, c2s_copy_session/2,
         c2s_session_resumed/1]).
%% for tests and operators (ejabberdctl debug)
-export([knobs/1, classify/3]).

-include("xmpp.hrl").
-include("logger.hrl").

-define(NS_PLUGIN, <<"urn:xmpp-push:plugin:1">>).
-define(PROTOCOL_VERSION, <<"1">>).
-define(UNDECIDED, xmpp_push_undecided).
%% A timer may fire a little before the queue's timestamps say the delay is up
%% (they are taken at different moments); this much early is close enough.
-define(TIMER_SLACK_MS, 20).
-define(SEQ_MOD, 4294967296).

-define(XNS_CARBONS, <<"urn:xmpp:carbons:2">>).
-define(XNS_FORWARD, <<"urn:xmpp:forward:0">>).
-define(XNS_MAM, [<<"urn:xmpp:mam:0">>, <<"urn:xmpp:mam:1">>,
                 <<"urn:xmpp:mam:2">>, <<"urn:xmpp:mam:tmp">>]).
-define(XNS_OMEMO, [<<"eu.siacs.conversations.axolotl">>, <<"urn:xmpp:omemo:2">>]).
-define(XNS_PGP_LEGACY, <<"jabber:x:encrypted">>).
-define(XNS_OX, <<"urn:xmpp:openpgp:0">>).
-define(XNS_JINGLE_MESSAGE, [<<"urn:xmpp:jingle-message:0">>,
                            <<"urn:xmpp:jingle-message:1">>]).
-define(XNS_REFERENCE, <<"urn:xmpp:reference:0">>).
-define(XNS_PUBSUB_EVENT, <<"http://jabber.org/protocol/pubsub#event">>).
-define(XNS_MUCSUB_MESSAGES, <<"urn:xmpp:mucsub:nodes:messages">>).
-define(XNS_JABBER_CLIENT, <<"jabber:client">>).

-type c2s_state() :: ejabberd_c2s:state().
-type knobs() :: #{undecided_delay := non_neg_integer(),        % ms
                   hibernation_keepalive := non_neg_integer(),  % s
                   include_body := boolean(),
                   include_sender := boolean()}.
%% What a push-worthy stanza looks like to the component.
-type info() :: #{sender := binary(), type := binary(), encrypted := boolean(),
                  call := boolean(), mention := boolean(), body := binary() | none}.

%%%===================================================================
%%% gen_mod
%%%===================================================================
-spec start(binary(), gen_mod:opts()) -> ok.
start(Host, _Opts) ->
    gen_iq_handler:add_iq_handler(ejabberd_local, Host, ?NS_PLUGIN, ?MODULE, process_iq),
    lists:foreach(fun({Hook, Function, Seq}) ->
                          ejabberd_hooks:add(Hook, Host, ?MODULE, Function, Seq)
                  end, hooks()),
    ask_for_configure(Host),
    ok.

-spec stop(binary()) -> ok.
stop(Host) ->
    lists:foreach(fun({Hook, Function, Seq}) ->
                          ejabberd_hooks:delete(Hook, Host, ?MODULE, Function, Seq)
                  end, hooks()),
    gen_iq_handler:remove_iq_handler(ejabberd_local, Host, ?NS_PLUGIN),
    _ = persistent_term:erase({?MODULE, Host}),
    ok.

-spec reload(binary(), gen_mod:opts(), gen_mod:opts()) -> ok.
reload(Host, _NewOpts, _OldOpts) ->
    ask_for_configure(Host),
    ok.

%% Sequence numbers: c2s_handle_send after mod_stream_mgmt (50), which puts the
%% stanza in mgmt_queue and counts it; offline_message_hook after mod_mam (49)
%% and mod_offline (50) have stored the message, before ejabberd_sm bounces
%% what nobody stored (100); c2s_session_pending after mod_push_keepalive (50),
%% so that our resumption timeout wins for armed sessions.
hooks() ->
    [{offline_message_hook, offline_message, 60},
     {c2s_handle_send, c2s_handle_send, 60},
     {c2s_handle_info, c2s_handle_info, 50},
     {c2s_handle_cast, c2s_handle_cast, 50},
     {c2s_session_pending, c2s_session_pending, 60},
     {c2s_copy_session, c2s_copy_session, 50},
     {c2s_session_resumed, c2s_session_resumed, 60}].

-spec depends(binary(), gen_mod:opts()) -> [{module(), hard | soft}].
depends(_Host, _Opts) ->
    [{mod_stream_mgmt, soft}].

-spec mod_opt_type(atom()) -> econf:validator().
mod_opt_type(component) ->
    econf:and_then(econf:jid(), fun jid:encode/1).

mod_options(_Host) ->
    [component].

mod_doc() ->
    #{desc =>
          [<<"Reports the state of users' sessions to an xmpp-push component "
             "in direct mode (protocol urn:xmpp-push:plugin:1): a push-worthy "
             "message for a user without a session, for an armed session "
             "waiting for XEP-0198 resumption, or for an armed session that "
             "has not acknowledged it in time.">>, <<"">>,
           <<"Hibernation and undecided reports need mod_stream_mgmt.">>],
      opts =>
          [{component,
            #{value => <<"JID">>,
              desc => <<"The JID of the xmpp-push component. Only it may "
                        "configure and arm, and every notification goes to "
                        "it. Required.">>}}],
      example =>
          ["modules:",
           "  mod_xmpp_push:",
           "    component: push.example.org"]}.

%%%===================================================================
%%% Knobs (set by the component's configure, kept per host)
%%%===================================================================
-spec default_knobs() -> knobs().
default_knobs() ->
    #{undecided_delay => 5000,
      hibernation_keepalive => 259200,
      include_body => false,
      include_sender => true}.

-spec knobs(binary()) -> knobs().
knobs(Host) ->
    persistent_term:get({?MODULE, Host}, default_knobs()).

-spec set_knobs(binary(), knobs()) -> ok.
set_knobs(Host, Knobs) ->
    %% persistent_term updates are costly for the whole node: only on change.
    case knobs(Host) of
        Knobs -> ok;
        _ -> persistent_term:put({?MODULE, Host}, Knobs)
    end.

-spec component(binary()) -> jid().
component(Host) ->
    jid:decode(gen_mod:get_module_opt(Host, ?MODULE, component)).

%% An attribute left out takes its default: configure states the whole policy.
-spec parse_configure(xmlel()) -> {ok, knobs()} | {error, binary()}.
parse_configure(#xmlel{} = El) ->
    Defaults = default_knobs(),
    Fields = [{<<"undecided-delay">>, undecided_delay, fun parse_integer/1},
              {<<"hibernation-keepalive">>, hibernation_keepalive, fun parse_integer/1},
              {<<"include-body">>, include_body, fun parse_boolean/1},
              {<<"include-sender">>, include_sender, fun parse_boolean/1}],
    lists:foldl(
      fun(_, {error, _} = Err) ->
              Err;
         ({Attr, Key, Parse}, {ok, Acc}) ->
              case fxml:get_tag_attr(Attr, El) of
                  false ->
                      {ok, Acc#{Key => maps:get(Key, Defaults)}};
                  {value, Value} ->
                      case Parse(Value) of
                          {ok, Parsed} -> {ok, Acc#{Key => Parsed}};
                          error -> {error, <<"invalid ", Attr/binary>>}
                      end
              end
      end, {ok, Defaults}, Fields).

parse_integer(Value) ->
    try binary_to_integer(string:trim(Value)) of
        N when N >= 0 -> {ok, N};
        _ -> error
    catch error:badarg -> error
    end.

parse_boolean(Value) ->
    case string:trim(Value) of
        <<"true">> -> {ok, true};
        <<"1">> -> {ok, true};
        <<"false">> -> {ok, false};
        <<"0">> -> {ok, false};
        _ -> error
    end.

-spec knobs_element(knobs()) -> xmlel().
knobs_element(#{undecided_delay := Delay, hibernation_keepalive := Keepalive,
                include_body := Body, include_sender := Sender}) ->
    #xmlel{name = <<"configure">>,
           attrs = [{<<"xmlns">>, ?NS_PLUGIN},
                    {<<"undecided-delay">>, integer_to_binary(Delay)},
                    {<<"hibernation-keepalive">>, integer_to_binary(Keepalive)},
                    {<<"include-body">>, bool(Body)},
                    {<<"include-sender">>, bool(Sender)}]}.

format_knobs(#{undecided_delay := Delay, hibernation_keepalive := Keepalive,
                include_body := Body, include_sender := Sender}) ->
    io_lib:format("undecided-delay ~B ms, hibernation-keepalive ~B s, "
                  "include-body ~ts, include-sender ~ts",
                  [Delay, Keepalive, bool(Body), bool(Sender)]).

%% Loaded (or reloaded) while the component may be connected: ask it. If it is
%% not, the error is ignored: it sends configure itself when it connects.
-spec ask_for_configure(binary()) -> ok.
ask_for_configure(Host) ->
    try
        Component = component(Host),
        IQ = #iq{type = get, from = jid:make(Host), to = Component,
                 sub_els = [#xmlel{name = <<"configure">>,
                                   attrs = [{<<"xmlns">>, ?NS_PLUGIN}]}]},
        ejabberd_router:route_iq(IQ, fun(Answer) -> configure_answer(Host, Answer) end)
    catch Class:Reason ->
            ?WARNING_MSG("mod_xmpp_push: cannot ask ~ts for its configuration: ~p:~p",
                         [Host, Class, Reason])
    end,
    ok.

configure_answer(Host, #iq{type = result} = IQ) ->
    case find_child(IQ, <<"configure">>) of
        #xmlel{} = El ->
            case parse_configure(El) of
                {ok, Knobs} ->
                    set_knobs(Host, Knobs),
                    ?INFO_MSG("mod_xmpp_push: ~ts configured by its component: ~ts",
                              [Host, format_knobs(Knobs)]);
                {error, Why} ->
                    ?WARNING_MSG("mod_xmpp_push: ignoring the component's "
                                 "configuration for ~ts: ~ts", [Host, Why])
            end;
        none ->
            ?WARNING_MSG("mod_xmpp_push: the component answered ~ts's configure "
                         "request without <configure/>", [Host])
    end;
configure_answer(Host, Answer) ->
    ?DEBUG("mod_xmpp_push: no configuration from the component for ~ts yet (~p); "
           "it sends one when it connects", [Host, Answer]).

%%%===================================================================
%%% IQs from the component: configure, arm, disarm
%%%===================================================================
%% The p1_xmpp codec does not know our namespace: keep the raw element.
-spec decode_iq_subel(xmlel() | xmpp_element()) -> xmlel() | xmpp_element().
decode_iq_subel(El) ->
    El.

-spec process_iq(iq()) -> iq().
process_iq(#iq{from = From, to = #jid{lserver = Host}, lang = Lang} = IQ) ->
    case is_component(Host, From) of
        false ->
            Txt = <<"Only the xmpp-push component may use this namespace">>,
            xmpp:make_error(IQ, xmpp:err_forbidden(Txt, Lang));
        true ->
            try handle_request(Host, IQ)
            catch throw:{bad_request, Txt} ->
                    xmpp:make_error(IQ, xmpp:err_bad_request(Txt, Lang))
            end
    end.

handle_request(Host, #iq{type = Type, sub_els = [SubEl]} = IQ) ->
    #xmlel{name = Name} = El = to_xmlel(SubEl),
    case {Type, Name} of
        {set, <<"configure">>} ->
            case parse_configure(El) of
                {ok, Knobs} ->
                    set_knobs(Host, Knobs),
                    ?INFO_MSG("mod_xmpp_push: ~ts configured by its component: ~ts",
                              [Host, format_knobs(Knobs)]),
                    xmpp:make_iq_result(IQ, plugin_element());
                {error, Why} ->
                    throw({bad_request, Why})
            end;
        {get, <<"configure">>} ->
            %% Not in the protocol's flow, but handy when debugging.
            xmpp:make_iq_result(IQ, knobs_element(knobs(Host)));
        {set, <<"arm">>} ->
            JID = request_jid(Host, El),
            JID#jid.lresource == <<>> andalso
                throw({bad_request, <<"arm needs a full JID">>}),
            cast_sessions(JID, {?MODULE, arm}),
            xmpp:make_iq_result(IQ);
        {set, <<"disarm">>} ->
            cast_sessions(request_jid(Host, El), {?MODULE, disarm}),
            xmpp:make_iq_result(IQ);
        {get, _} when Name == <<"arm">>; Name == <<"disarm">> ->
            throw({bad_request, <<Name/binary, " must be a set">>});
        _ ->
            xmpp:make_error(IQ, xmpp:err_feature_not_implemented(
                                  <<"Unknown request">>, IQ#iq.lang))
    end.

-spec plugin_element() -> xmlel().
plugin_element() ->
    #xmlel{name = <<"plugin">>,
           attrs = [{<<"xmlns">>, ?NS_PLUGIN},
                    {<<"version">>, ?PROTOCOL_VERSION},
                    {<<"name">>, atom_to_binary(?MODULE, utf8)},
                    {<<"server">>, <<"ejabberd ", (server_version())/binary>>}]}.

server_version() ->
    try ejabberd_option:version()
    catch _:_ -> <<"unknown">>
    end.

request_jid(Host, El) ->
    case fxml:get_tag_attr(<<"jid">>, El) of
        {value, Value} ->
            try jid:decode(Value) of
                #jid{luser = U, lserver = Host} = JID when U /= <<>> -> JID;
                #jid{} -> throw({bad_request, <<"jid is not a user of this host">>})
            catch error:{bad_jid, _} ->
                    throw({bad_request, <<"invalid jid">>})
            end;
        false ->
            throw({bad_request, <<"missing jid">>})
    end.

%% A full JID: that session. A bare JID: every session of the user. None: fine,
%% arming is a hint and the session may just have closed.
cast_sessions(#jid{luser = U, lserver = S, lresource = <<>>}, Msg) ->
    lists:foreach(fun(R) -> cast_session(U, S, R, Msg) end,
                  ejabberd_sm:get_user_resources(U, S));
cast_sessions(#jid{luser = U, lserver = S, lresource = R}, Msg) ->
    cast_session(U, S, R, Msg).

cast_session(U, S, R, Msg) ->
    case ejabberd_sm:get_session_pid(U, S, R) of
        Pid when is_pid(Pid) -> ejabberd_c2s:cast(Pid, Msg);
        none -> ok
    end.

is_component(Host, #jid{} = From) ->
    try component(Host) of
        Component ->
            jid:tolower(jid:remove_resource(From))
                == jid:tolower(jid:remove_resource(Component))
    catch _:_ -> false
    end;
is_component(_Host, _From) ->
    false.

%%%===================================================================
%%% Offline: stored for later, no session got it
%%%===================================================================
-spec offline_message({atom(), message()}) -> {atom(), message()}.
offline_message({Action, #message{to = #jid{luser = U, lserver = S}} = Msg} = Acc)
  when Action == offlined; Action == archived ->
    %% Runs once per routed message, after mod_mam and mod_offline stored it:
    %% one message, one notify, whichever of them kept it.
    safe(fun() ->
                 case classify(Msg, U, S) of
                     {true, Info} -> notify(S, U, undefined, offline, 1, Info);
                     false -> ok
                 end
         end, ok, offline_message_hook),
    Acc;
offline_message(Acc) ->
    Acc.

%%%===================================================================
%%% Sessions: arming, hibernation, undecided
%%%===================================================================
-spec c2s_handle_cast(c2s_state(), term()) -> c2s_state() | {stop, c2s_state()}.
c2s_handle_cast(State, {?MODULE, arm}) ->
    {stop, safe(fun() -> arm(State) end, State, arm)};
c2s_handle_cast(State, {?MODULE, disarm}) ->
    {stop, safe(fun() -> disarm(State) end, State, disarm)};
c2s_handle_cast(State, _Msg) ->
    State.

arm(#{xmpp_push_armed := true} = State) ->
    State;
arm(#{jid := JID} = State) ->
    ?INFO_MSG("mod_xmpp_push: session ~ts armed", [jid:encode(JID)]),
    State1 = State#{xmpp_push_armed => true},
    case State1 of
        #{mgmt_state := pending} -> stretch_resume_timeout(State1);
        _ -> State1
    end.

disarm(#{xmpp_push_armed := true, jid := JID} = State) ->
    ?INFO_MSG("mod_xmpp_push: session ~ts disarmed", [jid:encode(JID)]),
    State1 = restore_resume_timeout(cancel_undecided_timer(State)),
    maps:without([xmpp_push_armed, xmpp_push_reported], State1);
disarm(State) ->
    State.

%% Every stanza the session sends (or queues, while pending) passes here, after
%% mod_stream_mgmt has put it in mgmt_queue and counted it in mgmt_stanzas_out.
-spec c2s_handle_send(c2s_state(), xmpp_element() | xmlel(), term()) -> c2s_state().
c2s_handle_send(#{xmpp_push_armed := true, mgmt_state := MgmtState} = State,
                #message{} = Msg, _SendResult)
  when MgmtState == active; MgmtState == pending ->
    safe(fun() -> stanza_sent(MgmtState, State, Msg) end, State, c2s_handle_send);
c2s_handle_send(State, _Pkt, _SendResult) ->
    State.

stanza_sent(MgmtState, State, Msg) ->
    Resent = xmpp:get_meta(Msg, mgmt_is_resent, false),
    case classify_for(State, Msg) of
        false ->
            State;
        {true, _Info} when MgmtState == active, Resent ->
            %% Resent after a resumption: still unacknowledged, and not queued
            %% again, so the timer reads it from the queue it inherited.
            ensure_undecided_timer(State);
        {true, Info} when MgmtState == active ->
            sent_while_active(State, Info);
        {true, Info} when MgmtState == pending ->
            notify_session(State, hibernated, 1, Info),
            State
    end.

sent_while_active(#{xmpp_push_reported := Reported,
                    mgmt_queue := Queue,
                    mgmt_stanzas_out := Out} = State, Info) ->
    case reported_unacked(Queue, Reported) of
        true ->
            %% The session was reported undecided and has not acknowledged
            %% since: this one cannot wait either.
            notify_session(State, undecided, 1, Info),
            State#{xmpp_push_reported => Out};
        false ->
            ensure_undecided_timer(maps:remove(xmpp_push_reported, State))
    end;
sent_while_active(State, _Info) ->
    ensure_undecided_timer(State).

ensure_undecided_timer(#{xmpp_push_timer := _} = State) ->
    State;
ensure_undecided_timer(#{lserver := Host} = State) ->
    start_undecided_timer(State, maps:get(undecided_delay, knobs(Host))).

start_undecided_timer(State, Ms) ->
    TRef = erlang:start_timer(max(Ms, 0), self(), ?UNDECIDED),
    State#{xmpp_push_timer => TRef}.

cancel_undecided_timer(#{xmpp_push_timer := TRef} = State) ->
    _ = erlang:cancel_timer(TRef),
    maps:remove(xmpp_push_timer, State);
cancel_undecided_timer(State) ->
    State.

-spec c2s_handle_info(c2s_state(), term()) -> c2s_state() | {stop, c2s_state()}.
c2s_handle_info(#{xmpp_push_timer := TRef} = State, {timeout, TRef, ?UNDECIDED}) ->
    State1 = maps:remove(xmpp_push_timer, State),
    {stop, safe(fun() -> undecided_timeout(State1) end, State1, c2s_handle_info)};
c2s_handle_info(State, {timeout, _TRef, ?UNDECIDED}) ->
    {stop, State};  % a timer cancelled too late
c2s_handle_info(State, _Info) ->
    State.

%% Has the oldest unacknowledged push-worthy stanza waited undecided-delay?
%% (An acknowledgement drops entries from mgmt_queue; what is left is unacked.)
undecided_timeout(#{xmpp_push_armed := true, mgmt_state := active,
                    mgmt_queue := Queue, lserver := Host} = State) ->
    Delay = maps:get(undecided_delay, knobs(Host)),
    case queue_push_worthy(State, Queue) of
        [] ->
            State;
        [{_, Oldest, _} | _] = Entries ->
            %% Queue timestamps are wall-clock: a clock set back must not
            %% postpone the report beyond one more delay.
            Age = max(0, timer:now_diff(erlang:timestamp(), Oldest) div 1000),
            if Age + ?TIMER_SLACK_MS >= Delay ->
                    {LastN, _, _} = lists:last(Entries),
                    notify_session(State, undecided, length(Entries),
                                   representative(Entries)),
                    State#{xmpp_push_reported => LastN};
               true ->
                    start_undecided_timer(State, Delay - Age)
            end
    end;
undecided_timeout(State) ->
    State.

%% Is the newest reported stanza (number Reported) still in the queue? Acks
%% are cumulative: it is iff the queue's head is at or before it.
reported_unacked(Queue, Reported) ->
    case p1_queue:peek(Queue) of
        {value, {Head, _, _}} -> seq_le(Head, Reported);
        empty -> false
    end.

%% mgmt sequence numbers wrap at 2^32.
seq_le(A, B) ->
    ((B - A) rem ?SEQ_MOD + ?SEQ_MOD) rem ?SEQ_MOD < ?SEQ_MOD div 2.

-spec c2s_session_pending(c2s_state()) -> c2s_state().
c2s_session_pending(#{xmpp_push_armed := true} = State) ->
    safe(fun() -> hibernate(State) end, State, c2s_session_pending);
c2s_session_pending(State) ->
    State.

hibernate(#{mgmt_queue := Queue} = State) ->
    State1 = maps:remove(xmpp_push_reported, cancel_undecided_timer(State)),
    case queue_push_worthy(State1, Queue) of
        [] -> ok;
        Entries -> notify_session(State1, hibernated, length(Entries),
                                  representative(Entries))
    end,
    stretch_resume_timeout(State1).

%% While armed and pending, the session stays resumable for
%% hibernation-keepalive instead of mod_stream_mgmt's resume_timeout.
stretch_resume_timeout(#{xmpp_push_timeout_orig := _} = State) ->
    State;
stretch_resume_timeout(#{lserver := Host, mgmt_timeout := Orig} = State)
  when is_integer(Orig), Orig > 0 ->
    case maps:get(hibernation_keepalive, knobs(Host)) of
        0 ->
            State;
        Seconds ->
            ?INFO_MSG("mod_xmpp_push: armed session ~ts stays resumable for ~B s "
                      "(hibernation-keepalive)", [jid:encode(maps:get(jid, State)), Seconds]),
            State1 = mod_stream_mgmt:set_resume_timeout(State, Seconds * 1000),
            State1#{xmpp_push_timeout_orig => Orig}
    end;
stretch_resume_timeout(State) ->
    State.

restore_resume_timeout(#{xmpp_push_timeout_orig := Orig} = State) ->
    State1 = mod_stream_mgmt:set_resume_timeout(State, Orig),
    maps:remove(xmpp_push_timeout_orig, State1);
restore_resume_timeout(State) ->
    State.

%% A resumed session is the same session: it stays armed.
-spec c2s_copy_session(c2s_state(), c2s_state()) -> c2s_state().
c2s_copy_session(State, #{xmpp_push_armed := true} = OldState) ->
    State1 = State#{xmpp_push_armed => true},
    case OldState of
        #{xmpp_push_timeout_orig := Orig} -> State1#{xmpp_push_timeout_orig => Orig};
        _ -> State1
    end;
c2s_copy_session(State, _OldState) ->
    State.

-spec c2s_session_resumed(c2s_state()) -> c2s_state().
c2s_session_resumed(#{xmpp_push_timeout_orig := _} = State) ->
    safe(fun() -> restore_resume_timeout(State) end, State, c2s_session_resumed);
c2s_session_resumed(State) ->
    State.

%% [{N, Timestamp, Info}] of the push-worthy stanzas in mgmt_queue, oldest first.
queue_push_worthy(#{user := U, lserver := S}, Queue) ->
    Entries = p1_queue:foldl(
                fun({N, Ts, Pkt}, Acc) ->
                        case classify(Pkt, U, S) of
                            {true, Info} -> [{N, Ts, Info} | Acc];
                            false -> Acc
                        end
                end, [], Queue),
    lists:reverse(Entries).

%% The stanza a multi-stanza notify describes: the newest call if there is
%% one (a ringing phone matters most), else the newest; a mention anywhere
%% makes it a mention.
representative(Entries) ->
    Infos = [Info || {_, _, Info} <- Entries],
    Chosen = case [I || #{call := true} = I <- Infos] of
                 [] -> lists:last(Infos);
                 Calls -> lists:last(Calls)
             end,
    Chosen#{mention => lists:any(fun(#{mention := M}) -> M end, Infos)}.

classify_for(#{user := U, lserver := S}, Msg) ->
    classify(Msg, U, S).

%%%===================================================================
%%% Push-worthiness
%%%===================================================================
%% A message that is not error/headline, not a sent carbon nor a MAM result,
%% with a non-empty body, an encrypted payload or a call <propose/> (for a
%% received carbon or a MucSub event, the message inside decides).
-spec classify(xmpp_element() | xmlel() | term(), binary(), binary())
      -> {true, info()} | false.
classify(#message{} = Msg, LUser, LServer) ->
    try to_xmlel(Msg) of
        El -> classify(El, LUser, LServer)
    catch _:_ -> false
    end;
classify(#xmlel{name = <<"message">>} = El, LUser, LServer) ->
    case unwrap(El) of
        {ok, Inner} -> classify_message(Inner, LUser, LServer);
        skip -> false
    end;
classify(_Other, _LUser, _LServer) ->
    false.

unwrap(El) ->
    Children = elements(El),
    case has_child(Children, <<"sent">>, [?XNS_CARBONS])
        orelse has_child(Children, <<"result">>, ?XNS_MAM) of
        true ->
            skip;
        false ->
            case child(Children, <<"received">>, [?XNS_CARBONS]) of
                #xmlel{} = Received -> forwarded_message(Received);
                none ->
                    case mucsub_message(Children) of
                        #xmlel{} = Inner -> {ok, Inner};
                        none -> {ok, El}
                    end
            end
    end.

forwarded_message(Wrapper) ->
    case child(elements(Wrapper), <<"forwarded">>, [?XNS_FORWARD]) of
        #xmlel{} = Forwarded ->
            case child(elements(Forwarded), <<"message">>, [?XNS_JABBER_CLIENT, <<>>]) of
                #xmlel{} = Inner -> {ok, Inner};
                none -> skip
            end;
        none ->
            skip
    end.

mucsub_message(Children) ->
    case child(Children, <<"event">>, [?XNS_PUBSUB_EVENT]) of
        #xmlel{} = Event ->
            case child(elements(Event), <<"items">>, [?XNS_PUBSUB_EVENT, <<>>]) of
                #xmlel{} = Items ->
                    case fxml:get_tag_attr_s(<<"node">>, Items) of
                        ?XNS_MUCSUB_MESSAGES ->
                            Messages = [M || #xmlel{name = <<"item">>} = Item <- elements(Items),
                                             #xmlel{name = <<"message">>} = M <- elements(Item)],
                            case Messages of
                                [M | _] -> M;
                                [] -> none
                            end;
                        _ ->
                            none
                    end;
                none ->
                    none
            end;
        none ->
            none
    end.

classify_message(El, LUser, LServer) ->
    Type = case fxml:get_tag_attr_s(<<"type">>, El) of
               <<>> -> <<"normal">>;
               T -> T
           end,
    Children = elements(El),
    Body = body_text(Children),
    Encrypted = is_encrypted(Children),
    Call = lists:any(fun(C) -> is_el(C, <<"propose">>, ?XNS_JINGLE_MESSAGE) end, Children),
    Worthy = Type /= <<"error">> andalso Type /= <<"headline">>
        andalso (Body /= none orelse Encrypted orelse Call),
    case Worthy of
        false ->
            false;
        true ->
            Mention = Type == <<"groupchat">>
                andalso is_mention(Children, Body, LUser, LServer),
            {true, #{sender => fxml:get_tag_attr_s(<<"from">>, El),
                     type => Type,
                     encrypted => Encrypted,
                     call => Call,
                     mention => Mention,
                     body => Body}}
    end.

%% The body without xml:lang, else the first; none when empty or blank.
body_text(Children) ->
    Bodies = [B || #xmlel{name = <<"body">>} = B <- Children,
                   lists:member(ns(B), [<<>>, ?XNS_JABBER_CLIENT])],
    Chosen = case [B || B <- Bodies, fxml:get_tag_attr_s(<<"xml:lang">>, B) == <<>>] of
                 [B | _] -> B;
                 [] when Bodies /= [] -> hd(Bodies);
                 [] -> none
             end,
    case Chosen of
        none ->
            none;
        _ ->
            Text = fxml:get_tag_cdata(Chosen),
            case string:trim(Text) of
                <<>> -> none;
                _ -> Text
            end
    end.

%% An end-to-end encrypted payload: OMEMO (an <encrypted/> with a <payload/>;
%% key-transport elements carry none), legacy OpenPGP, OX.
is_encrypted(Children) ->
    lists:any(
      fun(#xmlel{name = <<"encrypted">>} = E) ->
              lists:member(ns(E), ?XNS_OMEMO)
                  andalso lists:any(fun(#xmlel{name = <<"payload">>}) -> true;
                                       (_) -> false
                                    end, elements(E));
         (#xmlel{name = <<"x">>} = E) -> ns(E) == ?XNS_PGP_LEGACY;
         (#xmlel{name = <<"openpgp">>} = E) -> ns(E) == ?XNS_OX;
         (_) -> false
      end, Children).

%% XEP-0372 mention of the user's JID, or the body naming the local part.
is_mention(Children, Body, LUser, LServer) ->
    Bare = <<LUser/binary, "@", LServer/binary>>,
    Referenced = lists:any(
                   fun(#xmlel{name = <<"reference">>} = R) ->
                           ns(R) == ?XNS_REFERENCE
                               andalso fxml:get_tag_attr_s(<<"type">>, R) == <<"mention">>
                               andalso mentions(fxml:get_tag_attr_s(<<"uri">>, R), Bare);
                      (_) ->
                           false
                   end, Children),
    Referenced orelse
        (is_binary(Body) andalso LUser /= <<>>
         andalso binary:match(string:lowercase(Body), string:lowercase(LUser)) /= nomatch).

mentions(<<"xmpp:", Uri/binary>>, Bare) ->
    try jid:decode(hd(binary:split(Uri, <<"?">>))) of
        JID -> jid:encode(jid:tolower(jid:remove_resource(JID))) == Bare
    catch _:_ -> false
    end;
mentions(_Uri, _Bare) ->
    false.

%%%===================================================================
%%% notify
%%%===================================================================
notify_session(#{user := U, lserver := S, resource := R}, StateName, Count, Info) ->
    notify(S, U, R, StateName, Count, Info).

-spec notify(binary(), binary(), binary() | undefined, atom(), pos_integer(), info()) -> ok.
notify(Host, LUser, Resource, StateName, Count, Info) ->
    #{include_body := IncludeBody, include_sender := IncludeSender} = knobs(Host),
    #{sender := Sender, type := Type, encrypted := Encrypted, call := Call,
      mention := Mention, body := Body} = Info,
    User = jid:encode(jid:make(LUser, Host)),
    Attrs = [{<<"xmlns">>, ?NS_PLUGIN}, {<<"user">>, User}]
        ++ [{<<"resource">>, Resource} || is_binary(Resource)]
        ++ [{<<"state">>, atom_to_binary(StateName, utf8)},
            {<<"count">>, integer_to_binary(Count)}]
        ++ [{<<"sender">>, Sender} || IncludeSender, Sender /= <<>>]
        ++ [{<<"type">>, Type},
            {<<"encrypted">>, bool(Encrypted)},
            {<<"call">>, bool(Call)},
            {<<"mention">>, bool(Mention)}],
    %% An encrypted message's body is only its fallback text: not worth sending.
    Children = [#xmlel{name = <<"body">>, children = [{xmlcdata, Body}]}
                || IncludeBody, is_binary(Body), not Encrypted],
    Notify = #xmlel{name = <<"notify">>, attrs = Attrs, children = Children},
    Component = component(Host),
    IQ = #iq{type = set, from = jid:make(Host), to = Component, sub_els = [Notify]},
    What = iolist_to_binary(
             [User, [[$/, Resource] || is_binary(Resource)], " ",
              atom_to_binary(StateName, utf8), " count=", integer_to_binary(Count)]),
    ?DEBUG("mod_xmpp_push: notify ~ts", [What]),
    %% Answers are logged, never retried: a notification is worth something only now.
    ejabberd_router:route_iq(
      IQ,
      fun(#iq{type = result}) ->
              ok;
         (#iq{type = error} = Answer) ->
              ?WARNING_MSG("mod_xmpp_push: ~ts refused notify (~ts): ~ts",
                           [jid:encode(Component), What, format_error(Answer)]);
         (timeout) ->
              ?WARNING_MSG("mod_xmpp_push: no answer from ~ts to notify (~ts)",
                           [jid:encode(Component), What])
      end).

format_error(IQ) ->
    try xmpp:get_error(IQ) of
        #stanza_error{} = Err -> xmpp:format_stanza_error(Err);
        _ -> <<"unknown error">>
    catch _:_ -> <<"undecodable error">>
    end.

%%%===================================================================
%%% Helpers
%%%===================================================================
%% Run a hook's work; on any error log it and carry on with Default, so that a
%% fault here never takes a user's session down.
safe(Fun, Default, Where) ->
    try Fun()
    catch Class:Reason:Stack ->
            ?ERROR_MSG("mod_xmpp_push: ~p failed: ~p:~p~n~p",
                       [Where, Class, Reason, Stack]),
            Default
    end.

to_xmlel(#xmlel{} = El) -> El;
to_xmlel(El) -> xmpp:encode(El).

find_child(IQ, Name) ->
    Els = [to_xmlel(E) || E <- xmpp:get_els(IQ)],
    child(Els, Name, [?NS_PLUGIN]).

elements(#xmlel{children = Children}) ->
    [C || #xmlel{} = C <- Children].

ns(El) ->
    fxml:get_tag_attr_s(<<"xmlns">>, El).

is_el(#xmlel{name = Name} = El, Name, Namespaces) ->
    lists:member(ns(El), Namespaces);
is_el(_, _, _) ->
    false.

child(Children, Name, Namespaces) ->
    case [C || C <- Children, is_el(C, Name, Namespaces)] of
        [C | _] -> C;
        [] -> none
    end.

has_child(Children, Name, Namespaces) ->
    child(Children, Name, Namespaces) /= none.

bool(true) -> <<"true">>;
bool(false) -> <<"false">>.
