"""Layer 11: the ``cryoprior`` command. One module per subcommand, each thin."""
