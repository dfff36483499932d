// Test support shared by projects: a minimal real gRPC analysis peer, a throwaway certificate authority
export {};
