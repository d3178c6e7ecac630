%% The ring benchmark of the 2015 write-up, as a correctness test: RING_NODES peer nodes,
%% RING_WORKERS workers on each; every worker sends its own RING_BYTES random binary around
%% the ring (worker I on node K forwards to worker I on node K+1), and the last node sends
%% `done' with the payload's hash back to the worker that started it. All workers at once,
%% once over distributed Erlang (`!') and once over `teleport:send/2', RING_ROUNDS times.
%%
%% Only correctness is asserted (every worker got `done', every hash intact); times are
%% printed with ct:pal, never checked. Defaults keep plain `rebar3 ct' short (3 nodes x 2
%% workers x 1 MB, 1 round); the 2015 size is
%%   RING_NODES=6 RING_WORKERS=8 RING_BYTES=10485760 RING_ROUNDS=3 rebar3 ct --suite ring_SUITE
%% `make bench' runs the full-size measurement (bench/ring_bench.erl).
-module(ring_SUITE).
-behaviour(gen_server).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1]).
-export([ring/1]).
%% The ring worker (runs on the peers).
-export([start_worker/2, init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(DEFAULT_NODES, 3).
-define(DEFAULT_WORKERS, 2).
-define(DEFAULT_BYTES, 1024 * 1024).
-define(DEFAULT_ROUNDS, 1).

suite() ->
    [{timetrap, {minutes, 30}}].

all() ->
    [ring].

init_per_suite(Config) ->
    Started = teleport_test_util:start_distribution("ring_ct_"),
    [{started_dist, Started} | Config].

end_per_suite(Config) ->
    teleport_test_util:stop_distribution(?config(started_dist, Config)),
    ok.

%%--------------------------------------------------------------------------------------------
%% The test

ring(_Config) ->
    NNodes = env_int("RING_NODES", ?DEFAULT_NODES),
    NWorkers = env_int("RING_WORKERS", ?DEFAULT_WORKERS),
    Bytes = env_int("RING_BYTES", ?DEFAULT_BYTES),
    Rounds = env_int("RING_ROUNDS", ?DEFAULT_ROUNDS),
    ?assert(NNodes >= 2),
    ?assert(NWorkers >= 1),
    ct:pal("ring: ~b nodes x ~b workers, ~b bytes per worker, ~b round(s)",
           [NNodes, NWorkers, Bytes, Rounds]),
    Peers = start_peers(NNodes),
    try
        Nodes = [N || {_, N, _} <- Peers],
        Workers = start_workers(Peers, Nodes, NWorkers),
        %% Prime: a tiny message around the ring sets up disterl connections between the
        %% peers and teleport's pools, so the timed runs do not pay for them.
        [check(run(Workers, T, prime, 60000), Workers) || T <- [disterl, teleport]],
        ok = prepare(Workers, Bytes),
        Timeout = 60000 + (Bytes div 1000) * NNodes * NWorkers div 20,
        Results = [{Round, T, check(run(Workers, T, bulk, Timeout), Workers)}
                   || Round <- lists:seq(1, Rounds), T <- [disterl, teleport]],
        [print(Round, T, R) || {Round, T, R} <- Results],
        summary(Results),
        %% The teleport runs really went over teleport: every payload crossed NNodes - 1
        %% links per round.
        BytesOut = lists:sum([maps:get(bytes_out, C, 0)
                              || N <- Nodes, C <- maps:values(erpc:call(N, teleport, stats, []))]),
        ct:pal("teleport bytes out, all peers: ~b", [BytesOut]),
        ?assert(BytesOut >= Rounds * NNodes * NWorkers * (NNodes - 1) * Bytes)
    after
        teleport_test_util:stop_peers(Peers)
    end.

%% Every worker reported once, with the hash it sent.
check(Results, Workers) ->
    ?assertEqual(length(Workers), length(Results)),
    ?assertEqual(lists:sort(Workers), lists:sort([{N, I} || #{node := N, index := I} <- Results])),
    [?assertEqual({N, I, true}, {N, I, Ok}) || #{node := N, index := I, hash_ok := Ok} <- Results],
    Results.

print(Round, T, Results) ->
    Us = [U || #{us := U} <- Results],
    ct:pal("round ~b, ~s: average ~.3f s, per worker (us): ~w",
           [Round, T, lists:sum(Us) / length(Us) / 1.0e6,
            lists:sort([{N, I, U} || #{node := N, index := I, us := U} <- Results])]).

summary(Results) ->
    Avg = fun(T) ->
                  Us = [U || {_, T1, Rs} <- Results, T1 =:= T, #{us := U} <- Rs],
                  lists:sum(Us) / length(Us) / 1.0e6
          end,
    D = Avg(disterl),
    Tp = Avg(teleport),
    ct:pal("average over all rounds: disterl ~.3f s, teleport ~.3f s, teleport/disterl ~.2f",
           [D, Tp, Tp / D]),
    ok.

env_int(Name, Default) ->
    case os:getenv(Name) of
        false -> Default;
        "" -> Default;
        S -> list_to_integer(string:trim(S))
    end.

%%--------------------------------------------------------------------------------------------
%% Peers and workers

%% N peers running teleport, started in parallel (each boot takes about a second), named
%% ring<runner's OS pid>_<I> in ring order. Controlled over disterl rather than standard_io
%% and with connect_all left true, as this suite's peers always were: nothing here stops
%% or cuts a peer, and the disterl ring connects the peers to each other anyway.
start_peers(N) ->
    Prefix = "ring" ++ os:getpid() ++ "_",
    {ok, Peers} = teleport_test_util:start_peers(
                    [#{name => list_to_atom(Prefix ++ integer_to_list(I)),
                       connection => distribution, connect_all => true}
                     || I <- lists:seq(1, N)]),
    Peers.

%% Returns [{Node, Index}].
start_workers(Peers, Nodes, NWorkers) ->
    [begin
         {ok, _} = erpc:call(Node, ?MODULE, start_worker, [I, Nodes]),
         {Node, I}
     end || {_P, Node, _} <- Peers, I <- lists:seq(1, NWorkers)].

prepare(Workers, Bytes) ->
    [ok = gen_server:call({name(I), N}, {prepare, Bytes}, 60000) || {N, I} <- Workers],
    ok.

%% Starts every worker (as close to together as the runner can) and collects the reports.
run(Workers, Transport, Kind, Timeout) ->
    Ref = make_ref(),
    [gen_server:cast({name(I), N}, {go, Transport, Kind, self(), Ref}) || {N, I} <- Workers],
    [receive
         {ring_result, Ref, Result} -> Result
     after Timeout ->
             ct:fail({ring_timeout, Transport, Kind})
     end || _ <- Workers].

%%--------------------------------------------------------------------------------------------
%% The worker: a gen_server on every peer, registered as ring_worker_<I>

name(I) ->
    list_to_atom("ring_worker_" ++ integer_to_list(I)).

start_worker(I, Nodes) ->
    gen_server:start({local, name(I)}, ?MODULE, {I, Nodes}, []).

init({I, Nodes}) ->
    {ok, #{index => I, name => name(I), route => route(Nodes),
           payload => <<"prime">>, hash => hash(<<"prime">>), pending => #{}}}.

%% The nodes after this one, around the ring.
route(Nodes) ->
    {Before, [_Me | After]} = lists:splitwith(fun(N) -> N =/= node() end, Nodes),
    After ++ Before.

handle_call({prepare, Bytes}, _From, State) ->
    Payload = crypto:strong_rand_bytes(Bytes),
    {reply, ok, State#{payload := Payload, hash := hash(Payload)}}.

handle_cast({go, T, Kind, Controller, Ref}, State = #{name := Name, route := [Next | Rest],
                                                       pending := Pending}) ->
    %% Only the last node hashes inside the timed part.
    {Payload, Hash} = case Kind of
                          prime -> {<<"prime">>, hash(<<"prime">>)};
                          bulk -> {maps:get(payload, State), maps:get(hash, State)}
                      end,
    T0 = erlang:monotonic_time(microsecond),
    send(T, {Name, Next}, {ring, T, self(), Ref, Rest, Payload}),
    {noreply, State#{pending := Pending#{Ref => {T0, Controller, Hash}}}}.

handle_info({ring, T, Origin, Ref, [], Payload}, State) ->
    %% The last node: done, with the hash of what arrived.
    send(T, Origin, {ring_done, Ref, hash(Payload)}),
    {noreply, State};
handle_info({ring, T, Origin, Ref, [Next | Rest], Payload}, State = #{name := Name}) ->
    send(T, {Name, Next}, {ring, T, Origin, Ref, Rest, Payload}),
    {noreply, State};
handle_info({ring_done, Ref, Hash}, State = #{index := I, pending := Pending}) ->
    T1 = erlang:monotonic_time(microsecond),
    {{T0, Controller, Sent}, Pending1} = maps:take(Ref, Pending),
    Controller ! {ring_result, Ref, #{node => node(), index => I, us => T1 - T0,
                                      hash_ok => Hash =:= Sent}},
    {noreply, State#{pending := Pending1}}.

send(disterl, Dest, Msg) ->
    Dest ! Msg,
    ok;
send(teleport, Dest, Msg) ->
    ok = teleport:send(Dest, Msg).

hash(Bin) ->
    {byte_size(Bin), erlang:crc32(Bin)}.
