export {
  DEFAULT_HEKI_POLICY,
  HekiSink,
  HekiSinkError,
  type DenialDecider,
  type HekiConfigureRecord,
  type HekiCr,
  type HekiDenialAction,
  type HekiDenialRecord,
  type HekiPolicy,
  type HekiSinkEvents,
  type HekiSinkOptions,
  type HekiVmState,
} from './sink.js';
export {
  HekiForwarder,
  decodeHekiKvmRun,
  type HekiEnabled,
  type HekiForwarderOptions,
  type HekiKvmRunExit,
  type VmmCompletion,
} from './reference-client.js';
export { hekiJson, vmsWithHeki, vmWithHeki } from './api.js';
