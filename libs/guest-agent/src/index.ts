// The guest agent: /dev/kvmmem (ABI v1/v2) through a native addon, memory sessions, hashing and signature scans
export {};
