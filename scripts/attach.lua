-- Open a REPL inside a running rank (serve, bench, a job under launch): inspect it, change its policy.
return require("moonshard.attach").main(arg)
