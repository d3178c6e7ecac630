%% @doc Hosts in Linux network namespaces, for the link benchmark (`make bench-net',
%% net_bench) and its smoke test (test/netns_SUITE): the one place that builds them, starts
%% Erlang nodes in them and tears them down.
%%
%% A network is a set of namespaces named `tpn<run>-<suffix>' (the run id is unique per
%% run, see run_id/0), so two runs never collide and a run's leftovers are found by name:
%%
%%   pair   two hosts, `h1' and `h2', joined by one veth pair (`eth0' in each);
%%   star   N hosts (2..8), each joined by a veth pair to a bridge `br0' in a switch
%%          namespace `sw' (the host ends are `eth0', the switch ends `p<I>').
%%
%% Every device is created directly inside its namespace (`ip link add ... netns'), so
%% nothing is ever added to the machine's own namespace and deleting the namespaces removes
%% every veth, bridge and qdisc with them. Host I has the address 10.77.0.I/24, which exists
%% only inside these namespaces: traffic between the hosts never leaves them. Each host has
%% its own loopback and its own epmd, and its egress (`eth0') is shaped by a `tc' token
%% bucket (tbf) to the link rate. The kernels this was written on have no netem, fq or
%% fq_codel: bandwidth is shaped, propagation delay is not emulated.
%%
%% Nodes are started with `ip netns exec <ns> erl -name <name>@10.77.0.I' through OTP's
%% `peer' with its `standard_io' connection: the controlling node needs no network path to
%% them (it runs outside the namespaces) and talks to each over the pipes of its port; the
%% nodes talk to each other over the shaped link only. When the controller dies, the pipes
%% close and the nodes halt.
%%
%% Cleanup (stop/1, cleanup_run/1) kills every process in each namespace of the run (erl
%% nodes, epmd), then deletes the namespaces; `make bench-net' also calls cleanup_run/1
%% from a shell trap, so a killed run leaves nothing behind either.
-module(teleport_netns).

-export([available/0, run_id/0, check_rate/1, check_hosts/1, rate_bits/1]).
-export([pair/1, star/2, stop/1, cleanup_run/1, leftovers/1, namespaces/1]).
-export([hosts/1, host_ip/2, start_node/3, stop_node/1, link_down/2, link_up/2,
         reset_connections/3, set_rate/2, qdisc/1]).
-export([cleanup_main/0]).

-export_type([net/0]).

%% A network: its run id, rate, namespaces (hosts first) and hosts, in order.
-type net() :: #{run := string(), rate := string(), namespaces := [string()],
                 hosts := [#{ns := string(), ip := string(), index := pos_integer()}],
                 topology := pair | star}.

-define(PREFIX, "tpn").
-define(SUBNET, "10.77.0.").
-define(MIN_HOSTS, 2).
-define(MAX_HOSTS, 8).

%%% ----------------------------------------------------------------------------------------
%%% Preconditions and parameters

%% @doc `ok' when this machine lets us make network namespaces (root, `ip' and `tc' from
%% iproute2, a kernel with veth and tbf), else `{no, Why}' with a sentence saying what is
%% missing. Probes by making (and deleting) a namespace with a shaped veth pair.
-spec available() -> ok | {no, string()}.
available() ->
    case {os:find_executable("ip"), os:find_executable("tc")} of
        {false, _} -> {no, "the `ip' command (Debian package iproute2) is not installed"};
        {_, false} -> {no, "the `tc' command (Debian package iproute2) is not installed"};
        _ ->
            case string:trim(os:cmd("id -u")) of
                "0" -> probe();
                _ -> {no, "network namespaces need root (this runs as uid " ++
                           string:trim(os:cmd("id -u")) ++ ")"}
            end
    end.

probe() ->
    Run = run_id(),
    try pair(#{run => Run, rate => "1gbit"}) of
        Net -> stop(Net), ok
    catch
        error:{netns_command_failed, Cmd, Out} ->
            cleanup_run(Run),
            {no, lists:flatten(io_lib:format("network namespaces are not allowed here: `~ts' "
                                             "failed: ~ts", [Cmd, string:trim(Out)]))}
    end.

%% @doc A run id unique on this machine: the OS pid of the process that owns the run
%% (`TELEPORT_NETNS_RUN' when the shell that started us set it, else this VM's) and a
%% random suffix, e.g. `"4242x9f3a"'.
-spec run_id() -> string().
run_id() ->
    Owner = case os:getenv("TELEPORT_NETNS_RUN") of
                false -> os:getpid();
                "" -> os:getpid();
                Set -> Set
            end,
    Owner ++ "x" ++ integer_to_list(rand:uniform(16#ffff) - 1, 16).

%% @doc Checks a link rate given as `tc' writes it (`1gbit', `500mbit', `10gbit', ...):
%% returns it, or fails at once naming the parameter and what it accepts.
-spec check_rate(string()) -> string().
check_rate(Rate) ->
    _ = rate_bits(Rate),
    Rate.

%% @doc The rate in bits per second. Accepts what `tc' accepts for a rate: a number and
%% one of bit, kbit, mbit, gbit, tbit (SI, base 1000), bps, kbps, mbps, gbps, tbps (bytes
%% per second); a bare number is bytes per second, as for tc.
-spec rate_bits(string()) -> pos_integer().
rate_bits(Rate) ->
    case re:run(string:lowercase(Rate), "^([0-9]+(?:\\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit|bps|"
                "kbps|mbps|gbps|tbps)?$", [{capture, all_but_first, list}]) of
        {match, [Num | Unit]} ->
            N = case string:to_float(Num) of
                    {F, []} -> F;
                    _ -> list_to_integer(Num)
                end,
            Mult = case Unit of
                       [] -> 8;
                       ["bit"] -> 1;
                       ["kbit"] -> 1.0e3;
                       ["mbit"] -> 1.0e6;
                       ["gbit"] -> 1.0e9;
                       ["tbit"] -> 1.0e12;
                       ["bps"] -> 8;
                       ["kbps"] -> 8.0e3;
                       ["mbps"] -> 8.0e6;
                       ["gbps"] -> 8.0e9;
                       ["tbps"] -> 8.0e12
                   end,
            case round(N * Mult) of
                Bits when Bits >= 8000, Bits =< 1.0e12 * 8 -> Bits;
                _ -> bad_param("LINK_RATE", Rate, "a rate from 1kbps to 8tbit (tc's units, "
                               "e.g. 1gbit, 500mbit, 10gbit)")
            end;
        nomatch ->
            bad_param("LINK_RATE", Rate, "a rate as tc writes it: a number and bit, kbit, mbit, "
                      "gbit, tbit (bits/s) or bps, kbps, mbps, gbps (bytes/s), e.g. 1gbit")
    end.

%% @doc Checks a host count (the ring's): returns it, or fails at once naming the
%% parameter and what it accepts.
-spec check_hosts(term()) -> 2..8.
check_hosts(N) when is_integer(N), N >= ?MIN_HOSTS, N =< ?MAX_HOSTS -> N;
check_hosts(N) -> bad_param("NET_HOSTS", N, "an integer from 2 to 8").

-spec bad_param(string(), term(), string()) -> no_return().
bad_param(Name, Value, Accepts) ->
    Msg = lists:flatten(io_lib:format("bad parameter ~s=~tp: expected ~ts", [Name, Value, Accepts])),
    erlang:error({bad_parameter, Name, Msg}).

%%% ----------------------------------------------------------------------------------------
%%% Building and tearing down

%% @doc Two hosts joined by one veth pair, each end shaped to `rate'. Options: `run' (a
%% run id, default run_id()), `rate' (default "1gbit"). On any failure what was made so far
%% is removed before the error is raised.
-spec pair(map()) -> net().
pair(Opts) ->
    {Run, Rate} = opts(Opts),
    Net = new(Run, Rate, pair, 2, []),
    build(Net, fun() ->
                       [H1, H2] = maps:get(hosts, Net),
                       [ns_setup(H) || H <- [H1, H2]],
                       ip(["link", "add", "name", "eth0", "netns", ns(H1), "type", "veth",
                           "peer", "name", "eth0", "netns", ns(H2)]),
                       [host_up(H, Rate) || H <- [H1, H2]]
               end).

%% @doc `N' hosts (2..8) on a bridge in a switch namespace, each host's egress shaped to
%% `rate' (options as pair/1).
-spec star(pos_integer(), map()) -> net().
star(N, Opts) ->
    _ = check_hosts(N),
    {Run, Rate} = opts(Opts),
    Sw = ns_name(Run, "sw"),
    Net = new(Run, Rate, star, N, [Sw]),
    build(Net, fun() ->
                       ip(["netns", "add", Sw]),
                       ip(["-n", Sw, "link", "set", "lo", "up"]),
                       ip(["-n", Sw, "link", "add", "br0", "type", "bridge"]),
                       ip(["-n", Sw, "link", "set", "br0", "up"]),
                       [begin
                            ns_setup(H),
                            Port = "p" ++ integer_to_list(I),
                            ip(["link", "add", "name", "eth0", "netns", ns(H), "type", "veth",
                                "peer", "name", Port, "netns", Sw]),
                            ip(["-n", Sw, "link", "set", Port, "master", "br0"]),
                            ip(["-n", Sw, "link", "set", Port, "up"]),
                            host_up(H, Rate)
                        end || #{index := I} = H <- maps:get(hosts, Net)]
               end).

opts(Opts) ->
    Run = maps:get(run, Opts, run_id()),
    Rate = check_rate(maps:get(rate, Opts, "1gbit")),
    {Run, Rate}.

new(Run, Rate, Topology, N, Extra) ->
    Hosts = [#{index => I, ns => ns_name(Run, "h" ++ integer_to_list(I)),
               ip => ?SUBNET ++ integer_to_list(I)} || I <- lists:seq(1, N)],
    #{run => Run, rate => Rate, topology => Topology, hosts => Hosts,
      namespaces => [maps:get(ns, H) || H <- Hosts] ++ Extra}.

build(Net, Fun) ->
    try
        _ = Fun(),
        Net
    catch
        C:E:S ->
            stop(Net),
            erlang:raise(C, E, S)
    end.

ns_setup(H) ->
    ip(["netns", "add", ns(H)]),
    ip(["-n", ns(H), "link", "set", "lo", "up"]).

%% The host's address, its link up, its egress shaped, its epmd started and answering.
host_up(#{ns := Ns, ip := Ip} = H, Rate) ->
    ip(["-n", Ns, "addr", "add", Ip ++ "/24", "dev", "eth0"]),
    ip(["-n", Ns, "link", "set", "eth0", "up"]),
    shape(H, Rate, "add"),
    _ = cmd(["ip", "netns", "exec", Ns, epmd(), "-daemon"]),
    wait_epmd(Ns, 100).

wait_epmd(Ns, 0) ->
    erlang:error({netns_command_failed, "epmd -names in " ++ Ns, "epmd did not answer in 10 s"});
wait_epmd(Ns, Tries) ->
    case run(["ip", "netns", "exec", Ns, epmd(), "-names"]) of
        {0, _} -> ok;
        _ -> timer:sleep(100), wait_epmd(Ns, Tries - 1)
    end.

epmd() ->
    case os:find_executable("epmd") of
        false -> "epmd";
        Path -> Path
    end.

%% tbf: the burst is a millisecond at the rate (at least 256 KB, as the hand-made
%% experiment this benchmark repeats), the queue 10 ms at the rate.
shape(#{ns := Ns}, Rate, Verb) ->
    Burst = max(262144, rate_bits(Rate) div 8 div 1000),
    Tc = ["tc", "-n", Ns, "qdisc", Verb, "dev", "eth0", "root", "tbf", "rate", Rate,
          "burst", integer_to_list(Burst), "latency", "10ms"],
    case run(Tc) of
        {0, _} -> ok;
        {_, Out} ->
            bad_param("LINK_RATE", Rate, "a rate tc accepts (tc said: " ++ string:trim(Out) ++ ")")
    end.

%% @doc Changes the shaping of every host of `Net' to `Rate'; returns the network with
%% its new rate.
-spec set_rate(net(), string()) -> net().
set_rate(Net = #{hosts := Hosts}, Rate) ->
    _ = check_rate(Rate),
    [shape(H, Rate, "change") || H <- Hosts],
    Net#{rate := Rate}.

%% @doc The qdisc of each host's `eth0', as `tc qdisc show' prints it.
-spec qdisc(net()) -> [string()].
qdisc(#{hosts := Hosts}) ->
    [string:trim(cmd(["tc", "-n", Ns, "qdisc", "show", "dev", "eth0"])) || #{ns := Ns} <- Hosts].

%% @doc Stops everything of `Net': every process in its namespaces, then the namespaces
%% (their veths, bridge and qdiscs go with them).
-spec stop(net()) -> ok.
stop(#{run := Run}) ->
    cleanup_run(Run).

%% @doc Removes every namespace of the run `Run' (whatever made it) and every process in
%% them. Bounded: gives up after a few tries per namespace, and returns `ok' either way;
%% leftovers/1 tells what is left.
-spec cleanup_run(string()) -> ok.
cleanup_run(Run) ->
    [cleanup_ns(Ns, 5) || Ns <- leftovers(Run)],
    ok.

cleanup_ns(_Ns, 0) ->
    ok;
cleanup_ns(Ns, Tries) ->
    Pids = string:lexemes(cmd(["ip", "netns", "pids", Ns]), "\n "),
    _ = [run(["kill", "-9", P]) || P <- Pids],
    case run(["ip", "netns", "del", Ns]) of
        {0, _} -> ok;
        _ -> timer:sleep(200), cleanup_ns(Ns, Tries - 1)
    end.

%% @doc The namespaces of run `Run' that exist now (`[]' after a clean stop).
-spec leftovers(string()) -> [string()].
leftovers(Run) ->
    with_prefix(ns_name(Run, "")).

with_prefix(Prefix) ->
    [Ns || Line <- string:split(cmd(["ip", "netns", "list"]), "\n", all),
           [Ns | _] <- [string:lexemes(Line, " ")],
           lists:prefix(Prefix, Ns)].

%% @doc The namespaces of `Net'.
-spec namespaces(net()) -> [string()].
namespaces(#{namespaces := Ns}) -> Ns.

%% @doc What `make bench-net''s shell trap runs: cleanup_run/1 of `TELEPORT_NETNS_RUN' (all
%% the runs that shell owned), then prints what is left, if anything.
-spec cleanup_main() -> ok.
cleanup_main() ->
    case os:getenv("TELEPORT_NETNS_RUN") of
        Owner when is_list(Owner), Owner =/= "" ->
            %% Run ids are Owner ++ "x" ++ suffix: every run of this owner.
            Prefix = ?PREFIX ++ Owner ++ "x",
            [cleanup_ns(Ns, 5) || Ns <- with_prefix(Prefix)],
            case with_prefix(Prefix) of
                [] -> ok;
                Left -> io:format("teleport_netns: could not remove ~p~n", [Left])
            end;
        _ ->
            ok
    end.

ns_name(Run, Suffix) -> ?PREFIX ++ Run ++ "-" ++ Suffix.

ns(#{ns := Ns}) -> Ns.

%%% ----------------------------------------------------------------------------------------
%%% Hosts, nodes and the link

%% @doc The hosts of `Net', in order.
-spec hosts(net()) -> [#{ns := string(), ip := string(), index := pos_integer()}].
hosts(#{hosts := Hosts}) -> Hosts.

%% @doc The address of host `I' (1-based).
-spec host_ip(net(), pos_integer()) -> string().
host_ip(#{hosts := Hosts}, I) -> maps:get(ip, lists:nth(I, Hosts)).

%% @doc Starts an Erlang node `Name'@<host I's address> in host I's namespace, with the
%% same code path as this node, the cookie `cookie' (default this node's, or `teleport_net'
%% when this node is not distributed) and extra `args'. Returns `{Peer, Node}'; call it
%% with peer:call/4,5 (its connection is standard_io).
-spec start_node(net(), pos_integer(), map()) -> {pid(), node()}.
start_node(Net, I, Opts) ->
    #{ns := Ns, ip := Ip} = lists:nth(I, hosts(Net)),
    Name = maps:get(name, Opts, "n" ++ integer_to_list(I)),
    Cookie = case {maps:get(cookie, Opts, undefined), node()} of
                 {undefined, nonode@nohost} -> "teleport_net";
                 {undefined, _} -> atom_to_list(erlang:get_cookie());
                 {C, _} -> C
             end,
    Erl = case os:find_executable("erl") of
              false -> erlang:error({netns_command_failed, "erl", "erl is not on the PATH"});
              E -> E
          end,
    Args = ["-setcookie", Cookie, "-connect_all", "false", "-pa" | code:get_path()]
        ++ maps:get(args, Opts, []),
    {ok, Peer, Node} = peer:start(#{name => Name, host => Ip, longnames => true,
                                    connection => standard_io, wait_boot => 60000,
                                    exec => {os:find_executable("ip"),
                                             ["netns", "exec", Ns, Erl]},
                                    args => Args}),
    {Peer, Node}.

%% @doc Stops a node started by start_node/3 (its namespace's cleanup would kill it too).
-spec stop_node(pid()) -> ok.
stop_node(Peer) ->
    _ = (catch peer:stop(Peer)),
    ok.

%% @doc Takes host I's link down (its `eth0'; the other end loses its carrier): nothing
%% goes in or out until link_up/2.
-spec link_down(net(), pos_integer()) -> ok.
link_down(Net, I) ->
    ip(["-n", ns(lists:nth(I, hosts(Net))), "link", "set", "eth0", "down"]).

%% @doc Brings host I's link back up (its address and route come back with it).
-spec link_up(net(), pos_integer()) -> ok.
link_up(Net, I) ->
    ip(["-n", ns(lists:nth(I, hosts(Net))), "link", "set", "eth0", "up"]).

%% @doc Resets (`ss -K', as a middlebox's RST would) every TCP connection of host I to
%% `{Ip, Port}'; the link stays up. Returns how many were reset.
-spec reset_connections(net(), pos_integer(), {string(), inet:port_number()}) -> non_neg_integer().
reset_connections(Net, I, {Ip, Port}) ->
    Ns = ns(lists:nth(I, hosts(Net))),
    case run(["ip", "netns", "exec", Ns, "ss", "-K", "-t", "-n", "dst", Ip, "dport", "=",
              ":" ++ integer_to_list(Port)]) of
        {0, Out} ->
            %% A header line, then one line per socket reset.
            length([L || L <- tl(string:split(Out, "\n", all)), string:trim(L) =/= ""]);
        {_, Out} ->
            erlang:error({netns_command_failed, "ss -K in " ++ Ns, Out})
    end.

%%% ----------------------------------------------------------------------------------------
%%% Commands

%% `ip Args', failing with the command and its output unless it exits with 0.
ip(Args) ->
    case run(["ip" | Args]) of
        {0, _} -> ok;
        {_, Out} -> erlang:error({netns_command_failed, string:join(["ip" | Args], " "), Out})
    end.

cmd(Argv) ->
    {_, Out} = run(Argv),
    Out.

%% Runs a program (found on the PATH) with arguments, no shell; {ExitStatus, Output}.
%% Bounded: a command taking over 30 s is killed.
run([Prog | Args]) ->
    case os:find_executable(Prog) of
        false ->
            {127, Prog ++ ": not found"};
        Exe ->
            Port = open_port({spawn_executable, Exe},
                             [{args, Args}, exit_status, stderr_to_stdout, binary, hide]),
            collect(Port, [], erlang:monotonic_time(millisecond) + 30000)
    end.

collect(Port, Acc, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, D}} -> collect(Port, [D | Acc], Deadline);
        {Port, {exit_status, S}} -> {S, unicode:characters_to_list(lists:reverse(Acc))}
    after Left ->
            catch port_close(Port),
            {124, unicode:characters_to_list(lists:reverse(Acc)) ++ " (timed out)"}
    end.
