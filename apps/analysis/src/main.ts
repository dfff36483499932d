// periscope analysis: configuration and process wiring for @periscope/analysis
export {};
