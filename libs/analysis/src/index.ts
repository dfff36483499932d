// The central analysis service: agent link server, inventory, policies, protection modules, alerts, exceptions, storage on PGlite or PostgreSQL
export {};
