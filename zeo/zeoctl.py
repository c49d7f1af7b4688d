"""Control a server daemon: ``python -m zeo.zeoctl -C zeo.conf ACTION``.

Actions: ``start``, ``stop``, ``restart``, ``status``, ``logreopen``
(and zdaemon's other commands: ``kill [SIGNAL]``, ``wait``, ``fg``,
``show``, ``logtail``, ``reopen_transcript``).

The work is done by zdaemon, the daemon controller of the ZODB world
(an optional dependency: ``pip install 'zeo-threaded[daemon]'``).  Its
``zdrun`` manager detaches from the terminal, runs ``python -m
zeo.runzeo -C zeo.conf``, restarts it if it dies (except after a clean
stop or a configuration error: exit statuses 0 and 2) and answers this
command through a Unix socket.

Everything zdaemon needs is derived from the server's own configuration
file, so there is one file to maintain:

* the run directory is the directory of ``pid-filename`` if the ``<zeo>``
  section sets one, else the directory of the configuration file;
* the control socket is ``RUNDIR/NAME.zdsock`` and the transcript (the
  server's standard output and error, where tracebacks of a failed start
  land) ``RUNDIR/NAME-transcript.log``, NAME being the configuration
  file's name without its extension.  ``--socket-name`` and
  ``--transcript`` choose other paths.

``logreopen`` reopens the transcript and sends SIGUSR2, on which the
server reopens its ``<eventlog>`` files: run it after logrotate moved
them.
"""

import argparse
import os
import sys

from zeo import server_config
from zeo.command_line import add_version_option, program_name

EXIT_CONFIGURATION_ERROR = 2


class _ArgumentParser(argparse.ArgumentParser):

    def error(self, message):
        print("Error: %s (see --help)" % message, file=sys.stderr)
        sys.exit(EXIT_CONFIGURATION_ERROR)


def build_argument_parser():
    parser = _ArgumentParser(
        prog=program_name("zeo.zeoctl"),
        description="Start, stop and query a zeo server run by zdaemon.",
        epilog="Actions: start, stop, restart, status, logreopen, "
               "kill [SIGNAL], wait, fg, show, logtail.")
    parser.add_argument(
        "-C", "--configure", required=True, metavar="FILE",
        help="the server's configuration file (as for zeo.runzeo -C)")
    parser.add_argument(
        "-s", "--socket-name", metavar="PATH",
        help="zdaemon's control socket (default RUNDIR/NAME.zdsock)")
    parser.add_argument(
        "-t", "--transcript", metavar="PATH",
        help="where the server's output goes (default "
             "RUNDIR/NAME-transcript.log)")
    parser.add_argument("action", help="what to do: start, stop, status, ...")
    parser.add_argument("arguments", nargs="*",
                        help="arguments of the action (kill SIGNAL)")
    add_version_option(parser)
    return parser


def run_paths(config_path, options):
    """`(socket_name, transcript)` derived from the server configuration."""
    if options.pid_filename is not None:
        run_directory = os.path.dirname(os.path.abspath(options.pid_filename))
    else:
        run_directory = os.path.dirname(config_path)
    name = os.path.splitext(os.path.basename(config_path))[0]
    return (os.path.join(run_directory, name + ".zdsock"),
            os.path.join(run_directory, name + "-transcript.log"))


def server_command(config_path):
    """The command zdaemon runs: this Python, our runzeo, this config."""
    return [sys.executable, "-m", "zeo.runzeo", "-C", config_path]


def controller_options(config_path, socket_name, transcript, action_args):
    """zdaemon's controller options, realized for one action."""
    import zdaemon.zdctl
    import zdaemon.zdrun
    options = zdaemon.zdctl.ZDCtlOptions()
    # Values set before realize() count as given: zdaemon then neither
    # needs a <runner> section nor splits the program line on spaces.
    options.program = server_command(config_path)
    options.zdrun = os.path.abspath(zdaemon.zdrun.__file__)
    options.realize(["-s", socket_name, "-t", transcript] + action_args,
                    progname="zeoctl")
    return options


def main(argv=None):
    """Run one controller action; return its exit status."""
    arguments = build_argument_parser().parse_args(argv)
    config_path = os.path.abspath(arguments.configure)
    try:
        server_options = server_config.parse_options(["-C", config_path])
    except server_config.ConfigurationError as error:
        print("Error: %s" % " ".join(str(error).split()), file=sys.stderr)
        return EXIT_CONFIGURATION_ERROR
    try:
        import zdaemon.zdctl
    except ImportError:
        print("Error: zeoctl needs zdaemon: pip install "
              "'zeo-threaded[daemon]' (or pip install zdaemon)",
              file=sys.stderr)
        return EXIT_CONFIGURATION_ERROR
    default_socket, default_transcript = run_paths(config_path,
                                                   server_options)
    options = controller_options(
        config_path,
        os.path.abspath(arguments.socket_name or default_socket),
        os.path.abspath(arguments.transcript or default_transcript),
        [arguments.action] + arguments.arguments)
    controller = zdaemon.zdctl.ZDCmd(options)
    if not hasattr(controller, "do_" + arguments.action):
        print("Error: unknown action %r (see --help)" % arguments.action,
              file=sys.stderr)
        return EXIT_CONFIGURATION_ERROR
    return controller.onecmd(" ".join(options.args)) or 0


if __name__ == "__main__":
    sys.exit(main())
