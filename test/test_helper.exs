# A clean machine has no epmd, and :net_kernel.start/1 (unlike `erl -sname`) does not start
# one: start it and wait until it answers, so the suites can become distributed nodes.
{_, 0} = System.cmd("epmd", ["-daemon"])

Enum.reduce_while(1..50, nil, fn _, _ ->
  case :erl_epmd.names() do
    {:ok, _} ->
      {:halt, :ok}

    _ ->
      Process.sleep(100)
      {:cont, nil}
  end
end)

ExUnit.start()
