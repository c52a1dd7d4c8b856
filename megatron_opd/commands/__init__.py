"""The command line, above every other room: `megatron-opd {convert,train,serve-teacher,cache-teacher}`
(`cli.py` dispatches), each command's argument parsing and the setup it does before handing over.
The quickstart (`megatron_opd.quickstart`) is a command too."""
