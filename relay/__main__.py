from relay.daemon.cli import entry

entry()
