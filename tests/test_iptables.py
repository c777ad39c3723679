"""`meshd iptables --dry-run`: the iptables-restore input (nat table, linkerd2-proxy-init's
rules under meshd's chain names). Applying them for real is tests/test_capture.py."""

from __future__ import annotations

from click.testing import CliRunner

from meshd.cli.iptables import installed, iptables, parse_ports, rules


def test_dry_run_prints_the_redirect_rules() -> None:
    result = CliRunner().invoke(iptables, [
        "--dry-run", "--proxy-uid", "2102", "--inbound-port", "4143", "--outbound-port", "4140",
        "--skip-inbound-ports", "4191,4192", "--skip-outbound-ports", "25,9000-9100"])
    assert result.exit_code == 0, result.output
    lines = [line.split(" -m comment")[0] for line in result.output.splitlines()
             if not line.startswith("#")]
    assert lines == [
        "*nat",
        ":MESHD_INBOUND - [0:0]",
        ":MESHD_OUTPUT - [0:0]",
        "-A MESHD_INBOUND -p tcp -m multiport --dports 4191,4192 -j RETURN",
        "-A MESHD_INBOUND -p tcp -j REDIRECT --to-ports 4143",
        "-A PREROUTING -j MESHD_INBOUND",
        "-A MESHD_OUTPUT -m owner --uid-owner 2102 -j RETURN",
        "-A MESHD_OUTPUT -o lo -j RETURN",
        "-A MESHD_OUTPUT -p tcp -m multiport --dports 25,9000:9100 -j RETURN",
        "-A MESHD_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
        "-A OUTPUT -j MESHD_OUTPUT",
        "COMMIT",
    ]


def test_one_direction_only() -> None:
    text = rules(2102, 4143, 4140, inbound=False)
    assert "MESHD_INBOUND" not in text and "-A OUTPUT -j MESHD_OUTPUT" in text
    text = rules(2102, 4143, 4140, outbound=False)
    assert "MESHD_OUTPUT" not in text and "-A PREROUTING -j MESHD_INBOUND" in text


def test_many_skip_ports_are_split_into_multiport_rules_of_at_most_15() -> None:
    ports = parse_ports(",".join(str(p) for p in range(1000, 1020)) + ",2000-2010")
    text = rules(2102, 4143, 4140, skip_outbound=ports)
    groups = [line.split("--dports ")[1].split(" ")[0] for line in text.splitlines()
              if "skip-outbound" in line]
    assert len(groups) == 2
    for g in groups:
        assert sum(2 if ":" in p else 1 for p in g.split(",")) <= 15
    listed = [p for g in groups for p in g.split(",")]
    assert listed == [str(p) for p in range(1000, 1020)] + ["2000:2010"]


def test_bad_ports_are_usage_errors() -> None:
    for bad in ("0", "70000", "10-5", "abc", "1-"):
        result = CliRunner().invoke(iptables, ["--dry-run", "--skip-inbound-ports", bad])
        assert result.exit_code == 2, bad
        assert "--skip-inbound-ports" in result.output


def test_installed_rules_are_recognised_in_iptables_save_output() -> None:
    saved = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j MESHD_INBOUND -m comment x\nCOMMIT\n"
    assert installed(saved)
    assert not installed("*nat\n:MESHD_OUTPUT - [0:0]\nCOMMIT\n")
