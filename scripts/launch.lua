-- Start N ranks of a script or command on this node (distributed runs; see --help).
return require("moonshard.launch").main(arg)
