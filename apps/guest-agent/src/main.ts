// periscope guest-agent: configuration and process wiring for @periscope/guest-agent
export {};
