%% @doc Helpers of `ring_bench': statistics, number formatting, a tiny JSON writer (the same
%% conventions as codec_bench's) and a hand-written SVG chart of bars with whiskers.
-module(bench_report).

-export([stats/1, pct/2, median/1]).
-export([fmt_s/1, fmt_us/1, fmt_rate/1, fmt_float/2, fmt_mb/1, fmt_ratio/1]).
-export([json/1, svg/3, svg/4, cpu_model/0]).

%%% ----------------------------------------------------------------------------------------
%%% Statistics (nearest rank, as codec_bench)

%% @doc min/p10/p50/p90/p99/max/mean/count of a non-empty list of numbers.
stats([]) ->
    #{count => 0};
stats(Values) ->
    T = list_to_tuple(lists:sort(Values)),
    N = tuple_size(T),
    P = fun(Q) -> element(max(1, min(N, ceil(Q * N))), T) end,
    #{count => N, min => element(1, T), p10 => P(0.10), p50 => P(0.50), p90 => P(0.90),
      p99 => P(0.99), max => element(N, T), mean => lists:sum(Values) / N}.

pct(Values, Q) ->
    T = list_to_tuple(lists:sort(Values)),
    N = tuple_size(T),
    element(max(1, min(N, ceil(Q * N))), T).

median(Values) ->
    pct(Values, 0.5).

%%% ----------------------------------------------------------------------------------------
%%% Formatting

fmt_s(S) -> fmt_float(S, 3) ++ " s".

fmt_us(Us) when Us < 1000 -> fmt_float(Us, 0) ++ " us";
fmt_us(Us) when Us < 1000000 -> fmt_float(Us / 1000, 2) ++ " ms";
fmt_us(Us) -> fmt_float(Us / 1000000, 3) ++ " s".

fmt_rate(R) when R >= 1000000 -> fmt_float(R / 1000000, 2) ++ " M";
fmt_rate(R) when R >= 10000 -> fmt_float(R / 1000, 1) ++ " k";
fmt_rate(R) -> fmt_float(R, 0).

fmt_mb(Bytes) -> fmt_float(Bytes / 1000000, 1) ++ " MB".

fmt_ratio(R) -> fmt_float(R, 2) ++ "x".

fmt_float(F, 0) -> integer_to_list(round(F));
fmt_float(F, D) -> float_to_list(float(F), [{decimals, D}]).

%%% ----------------------------------------------------------------------------------------
%%% Machine facts

%% @doc The CPU's model name from /proc/cpuinfo, or "unknown".
cpu_model() ->
    case file:read_file("/proc/cpuinfo") of
        {ok, Text} ->
            case re:run(Text, "^model name\\s*:\\s*(.*)$", [multiline, {capture, [1], list}]) of
                {match, [Model]} -> Model;
                nomatch -> "unknown"
            end;
        _ ->
            "unknown"
    end.

%%% ----------------------------------------------------------------------------------------
%%% JSON: {obj, [{Key, Value}]}, lists, strings (char lists or binaries), numbers,
%%% true/false/null and other atoms (as strings).

json({obj, Pairs}) ->
    ["{", lists:join(",", [[json_str(key(K)), ":", json(V)] || {K, V} <- Pairs]), "}"];
json(M) when is_map(M) ->
    json({obj, lists:sort(maps:to_list(M))});
json(true) -> "true";
json(false) -> "false";
json(null) -> "null";
json(A) when is_atom(A) -> json_str(atom_to_list(A));
json(I) when is_integer(I) -> integer_to_list(I);
json(F) when is_float(F) -> float_to_list(F, [{decimals, 6}, compact]);
json(B) when is_binary(B) -> json_str(unicode:characters_to_list(B));
json(L) when is_list(L) ->
    case io_lib:printable_unicode_list(L) of
        true when L =/= [] -> json_str(L);
        _ -> ["[", lists:join(",", [json(E) || E <- L]), "]"]
    end;
json(T) when is_tuple(T) -> json_str(lists:flatten(io_lib:format("~0p", [T])));
json(Other) -> json_str(lists:flatten(io_lib:format("~0p", [Other]))).

key(K) when is_atom(K) -> atom_to_list(K);
key(K) when is_binary(K) -> unicode:characters_to_list(K);
key(K) when is_list(K) -> K;
key(K) -> lists:flatten(io_lib:format("~0p", [K])).

json_str(S) ->
    [$", [esc(C) || C <- S], $"].

esc($") -> "\\\"";
esc($\\) -> "\\\\";
esc($\n) -> "\\n";
esc($\r) -> "\\r";
esc($\t) -> "\\t";
esc(C) when C < 32 -> io_lib:format("\\u~4.16.0b", [C]);
esc(C) -> unicode:characters_to_binary([C]).

%%% ----------------------------------------------------------------------------------------
%%% SVG: a grid of panels, each a few bars with whiskers on its own scale.
%%%
%%% Panel: #{title, unit, better => lower | higher, caption, top (optional: a fixed axis top),
%%%          bars => [#{label, series => disterl | teleport | raw | other,
%%%                     value, lo, hi}]}

-define(PW, 310).
-define(PH, 250).
-define(COLS, 3).
-define(TOP, 70).

svg(Title, Subtitle, Panels) ->
    svg(Title, Subtitle, Panels,
        #{legend => [{disterl, "disterl (!)"}, {teleport, "teleport"}, {raw, "raw loopback TCP"}],
          footer => "bars: median over measured rounds (warm-up excluded); whiskers: see each "
                    "panel's caption; teleport in blue, disterl in orange, raw TCP in grey"}).

%% @doc svg/3 with its own `legend' (`[{Series, Label}]') and `footer' line.
svg(Title, Subtitle, Panels, #{legend := Legend, footer := Footer}) ->
    Rows = (length(Panels) + ?COLS - 1) div ?COLS,
    W = ?COLS * ?PW + 20,
    H = ?TOP + Rows * ?PH + 40,
    Indexed = lists:zip(lists:seq(0, length(Panels) - 1), Panels),
    ["<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"", int(W), "\" height=\"", int(H),
     "\" viewBox=\"0 0 ", int(W), " ", int(H), "\" font-family=\"sans-serif\">\n",
     "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
     text(10, 24, 16, "start", "bold", Title),
     text(10, 44, 11, "start", "normal", Subtitle),
     legend(10, 58, Legend),
     [panel(10 + (I rem ?COLS) * ?PW, ?TOP + (I div ?COLS) * ?PH, P) || {I, P} <- Indexed],
     text(10, H - 12, 10, "start", "normal", Footer),
     "</svg>\n"].

legend(X, Y, Legend) ->
    [[rect(X + I * 110, Y - 9, 10, 10, colour(S)),
      text(X + I * 110 + 14, Y, 11, "start", "normal", Label)]
     || {I, {S, Label}} <- lists:zip(lists:seq(0, length(Legend) - 1), Legend)].

panel(X0, Y0, #{title := Title, unit := Unit, bars := Bars} = P) ->
    Better = case maps:get(better, P, higher) of
                 higher -> "higher is better";
                 lower -> "lower is better"
             end,
    PlotX = X0 + 50,
    PlotY = Y0 + 40,
    PlotW = ?PW - 70,
    PlotH = ?PH - 100,
    Values = [V || #{value := V} <- Bars],
    His = [maps:get(hi, B, V) || #{value := V} = B <- Bars],
    Top0 = max(lists:max(Values) * 1.25, min(lists:max(His) * 1.05, lists:max(Values) * 3)),
    {Top, NTicks} = case P of
                        #{top := Fixed} -> {Fixed, 5};
                        _ -> nice(case Top0 > 0 of true -> Top0; false -> 1.0 end)
                    end,
    Ticks = [Top * I / NTicks || I <- lists:seq(0, NTicks)],
    Y = fun(V) -> PlotY + PlotH - PlotH * min(V, Top) / Top end,
    N = length(Bars),
    Slot = PlotW / N,
    BarW = min(46, Slot * 0.6),
    [text(X0 + 4, Y0 + 14, 12, "start", "bold", Title),
     text(X0 + 4, Y0 + 28, 10, "start", "normal", [Unit, ", ", Better]),
     [[line(PlotX, Y(T), PlotX + PlotW, Y(T), "#e5e5e5"),
       text(PlotX - 4, Y(T) + 3, 9, "end", "normal", tick(T))] || T <- Ticks],
     line(PlotX, PlotY + PlotH, PlotX + PlotW, PlotY + PlotH, "#444"),
     line(PlotX, PlotY, PlotX, PlotY + PlotH, "#444"),
     [bar(PlotX + Slot * (I + 0.5), BarW, Y, Top, PlotY + PlotH, B)
      || {I, B} <- lists:zip(lists:seq(0, N - 1), Bars)],
     text(X0 + 4, Y0 + ?PH - 30, 9, "start", "normal", maps:get(caption, P, ""))].

bar(Cx, BarW, Y, Top, Base, #{label := Label, series := S, value := V} = B) ->
    Lo = maps:get(lo, B, V),
    Hi = maps:get(hi, B, V),
    Clipped = Hi > Top,
    [rect(Cx - BarW / 2, Y(V), BarW, Base - Y(V), colour(S)),
     line(Cx, Y(Lo), Cx, Y(Hi), "#222"),
     line(Cx - 6, Y(Lo), Cx + 6, Y(Lo), "#222"),
     case Clipped of
         true -> text(Cx + 8, Y(Hi) + 8, 9, "start", "normal", ["max ", tick(Hi), " (off scale)"]);
         false -> line(Cx - 6, Y(Hi), Cx + 6, Y(Hi), "#222")
     end,
     %% The value above the bar, or above its whisker.
     text(Cx, Y(case Clipped of true -> V; false -> max(V, Hi) end) - 4, 10,
          "middle", "bold", value_label(V)),
     text(Cx, Base + 13, 10, "middle", "normal", Label)].

value_label(V) -> tick(V).

tick(V) when V == 0 -> "0";
tick(V) when V >= 1000000 -> fmt_float(V / 1000000, 2) ++ "M";
tick(V) when V >= 10000 -> fmt_float(V / 1000, 0) ++ "k";
tick(V) when V >= 100 -> fmt_float(V, 0);
tick(V) when V >= 10 -> fmt_float(V, 1);
tick(V) when V >= 1 -> fmt_float(V, 2);
tick(V) -> float_to_list(float(V), [{decimals, 3}, compact]).

%% Rounds an axis top up to 1, 2, 2.5, 4, 5 or 8 times a power of ten, with a number of
%% intervals that gives round ticks.
nice(V) ->
    E = math:pow(10, floor(math:log10(V))),
    M = V / E,
    {Step, N} = hd([SN || {S, _} = SN <- [{1, 5}, {2, 4}, {2.5, 5}, {4, 4}, {5, 5}, {8, 4},
                                          {10, 5}],
                          S >= M - 1.0e-9]),
    {Step * E, N}.

colour(disterl) -> "#f28e2b";
colour(teleport) -> "#4e79a7";
colour(raw) -> "#9d9d9d";
colour(_) -> "#76b7b2".

rect(X, Y, W, H, Fill) ->
    ["<rect x=\"", num(X), "\" y=\"", num(Y), "\" width=\"", num(W), "\" height=\"",
     num(max(H, 0)), "\" fill=\"", Fill, "\"/>\n"].

line(X1, Y1, X2, Y2, Stroke) ->
    ["<line x1=\"", num(X1), "\" y1=\"", num(Y1), "\" x2=\"", num(X2), "\" y2=\"", num(Y2),
     "\" stroke=\"", Stroke, "\" stroke-width=\"1\"/>\n"].

text(X, Y, Size, Anchor, Weight, Text) ->
    ["<text x=\"", num(X), "\" y=\"", num(Y), "\" font-size=\"", int(Size),
     "\" text-anchor=\"", Anchor, "\" font-weight=\"", Weight, "\">", xml(Text), "</text>\n"].

xml(Text) ->
    [case C of
         $< -> "&lt;";
         $> -> "&gt;";
         $& -> "&amp;";
         $" -> "&quot;";
         _ -> unicode:characters_to_binary([C])
     end || C <- unicode:characters_to_list(iolist_to_binary(io_lib:format("~ts", [Text])))].

num(F) -> float_to_list(float(F), [{decimals, 1}, compact]).
int(I) -> integer_to_list(I).
