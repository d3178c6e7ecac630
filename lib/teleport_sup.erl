%% @doc The top supervisor: the log forwarder first (so the runtime's first events have
%% somewhere to go), the supervisor of the incoming connections' readers, then the server
%% that owns the runtime. `rest_for_one': a new log forwarder does not disturb the runtime,
%% a new runtime starts from a clean slate, and so does one whose readers were lost.
-module(teleport_sup).
-behaviour(supervisor).

-export([start_link/0, init/1]).

%% @doc Starts the supervision tree.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @private
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% Shared state that outlives the process using it: the supervisor owns it.
    ok = teleport_replies:create_table(),
    Flags = #{strategy => rest_for_one, intensity => 5, period => 10},
    Children = [#{id => teleport_log, start => {teleport_log, start_link, []}},
                #{id => teleport_reader_sup, start => {teleport_reader_sup, start_link, []},
                  type => supervisor, shutdown => infinity},
                #{id => teleport_server, start => {teleport_server, start_link, []},
                  shutdown => 5000},
                #{id => teleport_calls, start => {teleport_calls, start_link, []}},
                #{id => teleport_replies, start => {teleport_replies, start_link, []}}],
    {ok, {Flags, Children}}.
