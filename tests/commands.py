"""Running a command-line entry point (``module.main(argv)``) in-process, for the tests of the
train / evaluate / predict commands."""


def run_command(module, argv, capsys):
    """``module.main(argv)`` -> (exit status, stdout, stderr); argparse exits become statuses."""
    try:
        status = module.main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err
