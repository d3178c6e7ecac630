%% @doc The supervisor of the `teleport_reader' processes, one per incoming connection. The
%% server that owns the listener starts one here for each connection that authenticated.
%% Readers are temporary: a connection whose reader died is closed, and its peer connects
%% again and sends again what was not acknowledged.
-module(teleport_reader_sup).
-behaviour(supervisor).

-export([start_link/0, start_reader/1, readers/0, init/1]).

%% @doc Starts the supervisor.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @doc Starts a reader for the incoming connection `Reader'.
-spec start_reader(teleport_nif:reader()) -> {ok, pid()} | {error, term()}.
start_reader(Reader) ->
    supervisor:start_child(?MODULE, [Reader]).

%% @doc The reader processes now running.
-spec readers() -> [pid()].
readers() ->
    [Pid || {_, Pid, _, _} <- supervisor:which_children(?MODULE), is_pid(Pid)].

%% @private
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    Flags = #{strategy => simple_one_for_one, intensity => 0, period => 1},
    %% A reader stops at once when told to: a connection whose listener closes goes on
    %% alone for its last words (see teleport_reader:terminate/2).
    Reader = #{id => teleport_reader, start => {teleport_reader, start_link, []},
               restart => temporary, shutdown => 1000},
    {ok, {Flags, [Reader]}}.
