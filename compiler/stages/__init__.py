"""One module per stage. Each exposes run(step, out, inputs, log, ctx): `out` is the store Writer
(write outputs to out.path(name)), `inputs` maps the step's input roles to store entries, `log`
is the step's StepLog, `ctx` carries the toolchain fingerprint and who asked for the step."""
