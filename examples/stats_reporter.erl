%% @doc An example of wiring `teleport:stats/0' to a periodic report: a `gen_server' that
%% reads the counters every `interval' milliseconds and reports, for each peer node, what
%% happened since the last report (messages and bytes each way, drops, reconnections) and
%% the gauges as they are now (bytes queued, connections up).
%%
%% By default each report is a `logger' event (a report map, printed as one line); give
%% `report' a fun to send the numbers somewhere else (a metrics system, telemetry, ETS).
%% Copy this module into your application and add it to a supervisor:
%%
%% ```
%% #{id => stats_reporter, start => {stats_reporter, start_link, [#{interval => 10000}]}}
%% '''
%%
%% or start it by hand: `stats_reporter:start_link(#{interval => 1000})'.
%% A line looks like (one line; `make example' printed this one):
%% ```
%% teleport stats big_file_b_19648@vm over 0.6 s: out 12 msgs 100.0 MB (165.8 MB/s),
%% in 1 msgs 99 B (164 B/s), queued 0 B, dropped 0, reconnects 0, connections 1 out 1 in
%% '''
%%
%% `level' defaults to `info', which OTP's default primary level (`notice') hides; Elixir's
%% Logger shows it.
-module(stats_reporter).
-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/0, start_link/1, report_now/1, stop/1, deltas/2, format_report/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-type options() :: #{interval => pos_integer(),
                     idle => boolean(),
                     level => logger:level(),
                     report => fun((node(), delta()) -> term())}.
%% `interval': milliseconds between reports (default 10000). `idle': also report nodes
%% with no traffic since the last report (default false). `level': the logger level
%% (default info). `report': called with each node and its delta instead of logging.
-type delta() :: #{interval_ms := non_neg_integer(), atom() => integer()}.
%% The counters' increase since the last report, the gauges' current values, and the
%% milliseconds the delta covers.
-export_type([options/0, delta/0]).

%% Counters that only grow (reported as increases); everything else is a gauge.
-define(GAUGES, [queued_bytes, connections, connections_in]).

%% @doc `start_link(#{})': reports every 10 seconds through `logger'.
-spec start_link() -> gen_server:start_ret().
start_link() ->
    start_link(#{}).

%% @doc Starts the reporter, registered as `stats_reporter'.
-spec start_link(options()) -> gen_server:start_ret().
start_link(Opts) when is_map(Opts) ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, Opts, []).

%% @doc Reports at once what changed since the last report, for instance at the end of a
%% batch job; the next report comes a whole interval later.
-spec report_now(gen_server:server_ref()) -> ok.
report_now(Server) ->
    gen_server:call(Server, report_now).

%% @doc Stops a reporter.
-spec stop(gen_server:server_ref()) -> ok.
stop(Server) ->
    gen_server:stop(Server).

%% @doc What changed from `Before' to `After', two results of `teleport:stats/0': per node,
%% each counter's increase and each gauge's value in `After'. A node absent from `Before'
%% (or whose counters went back, teleport having restarted) counts from zero.
-spec deltas(Before, After) -> #{node() => #{atom() => integer()}} when
      Before :: #{node() => #{atom() => non_neg_integer()}},
      After :: #{node() => #{atom() => non_neg_integer()}}.
deltas(Before, After) ->
    maps:map(fun(Node, Now) ->
                     Prev = maps:get(Node, Before, #{}),
                     Restarted = lists:any(fun({K, V}) -> V < maps:get(K, Prev, 0) end,
                                           counters(Now)),
                     maps:map(fun(K, V) ->
                                      case lists:member(K, ?GAUGES) orelse Restarted of
                                          true -> V;
                                          false -> V - maps:get(K, Prev, 0)
                                      end
                              end, Now)
             end, After).

%% @doc Formats a report logged by this module as one line (its `report_cb').
-spec format_report(#{node := node(), delta := delta()}) -> {io:format(), [term()]}.
format_report(#{node := Node, delta := D}) ->
    G = fun(K) -> maps:get(K, D, 0) end,
    Secs = G(interval_ms) / 1000,
    {"teleport stats ~s over ~.1f s: out ~b msgs ~s (~s/s), in ~b msgs ~s (~s/s), "
     "queued ~s, dropped ~b, reconnects ~b, connections ~b out ~b in",
     [Node, Secs,
      G(msgs_out), bytes(G(bytes_out)), bytes(rate(G(bytes_out), Secs)),
      G(msgs_in), bytes(G(bytes_in)), bytes(rate(G(bytes_in), Secs)),
      bytes(G(queued_bytes)), G(dropped), G(reconnects), G(connections),
      G(connections_in)]}.

%% @private
-spec init(options()) -> {ok, map()}.
init(Opts) ->
    State = #{interval => maps:get(interval, Opts, 10000),
              idle => maps:get(idle, Opts, false),
              level => maps:get(level, Opts, info),
              report => maps:get(report, Opts, undefined),
              stats => teleport:stats(),
              at => erlang:monotonic_time(millisecond)},
    {ok, schedule(State)}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, ok | {error, unknown}, map()}.
handle_call(report_now, _From, State) ->
    {reply, ok, schedule(report(State))};
handle_call(_Request, _From, State) ->
    {reply, {error, unknown}, State}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info(tick, State) ->
    {noreply, schedule(report(State))};
handle_info(_Other, State) ->
    {noreply, State}.

%% Reports every node's delta since the last report.
-spec report(map()) -> map().
report(#{stats := Before, at := Then} = State) ->
    After = teleport:stats(),
    Now = erlang:monotonic_time(millisecond),
    maps:foreach(fun(Node, D) -> report(Node, D#{interval_ms => Now - Then}, State) end,
                 deltas(Before, After)),
    State#{stats := After, at := Now}.

-spec report(node(), delta(), map()) -> ok.
report(Node, D, #{idle := Idle, level := Level, report := Report}) ->
    case Idle orelse active(D) of
        false -> ok;
        true when is_function(Report, 2) -> _ = Report(Node, D), ok;
        true -> ?LOG(Level, #{node => Node, delta => D},
                     #{report_cb => fun ?MODULE:format_report/1})
    end.

%% Anything sent, received, dropped, reconnected, or still queued.
-spec active(delta()) -> boolean().
active(D) ->
    lists:any(fun(K) -> maps:get(K, D, 0) > 0 end,
              [msgs_out, msgs_in, dropped, reconnects, queued_bytes]).

-spec counters(#{atom() => non_neg_integer()}) -> [{atom(), non_neg_integer()}].
counters(Stats) ->
    [KV || {K, _} = KV <- maps:to_list(Stats), not lists:member(K, ?GAUGES)].

-spec schedule(map()) -> map().
schedule(#{interval := Interval} = State) ->
    _ = case State of
            #{timer := Old} -> erlang:cancel_timer(Old);
            #{} -> false
        end,
    receive tick -> ok after 0 -> ok end,
    State#{timer => erlang:send_after(Interval, self(), tick)}.

-spec rate(non_neg_integer(), float()) -> non_neg_integer().
rate(_Bytes, Secs) when Secs =< 0 -> 0;
rate(Bytes, Secs) -> round(Bytes / Secs).

-spec bytes(integer()) -> string().
bytes(N) when N >= 1000000000 -> lists:flatten(io_lib:format("~.1f GB", [N / 1.0e9]));
bytes(N) when N >= 1000000 -> lists:flatten(io_lib:format("~.1f MB", [N / 1.0e6]));
bytes(N) when N >= 1000 -> lists:flatten(io_lib:format("~.1f KB", [N / 1.0e3]));
bytes(N) -> integer_to_list(N) ++ " B".
