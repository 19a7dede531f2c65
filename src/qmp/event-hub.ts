// Event delivery shared by every QMP event source (our QMP socket client, libvirt's
// monitor-event subscription): receive order numbers, a bounded backlog of recent events,
// listeners, and waits with a predicate and a time limit that can look back (`since`) so
// "send a command, then wait for the event it causes" has no race.

import { QmpTimeoutError } from './errors.ts';
import { decodeEvent, isKnownEventName, type KnownEventName, type QmpEvent, type TypedEvent } from './events.ts';

/** The typed event for known names, the plain envelope for others. */
export type EventFor<N extends string> = N extends KnownEventName ? TypedEvent<N> : QmpEvent;

export interface WaitOptions {
  /** Also consider events already received after this seq (see `lastSeq`). */
  since?: number;
}

export interface EventHubOptions {
  /** Recent events kept for `since` look-backs. */
  backlog: number;
  /** Time limit of waitFor when none is given (ms). */
  defaultTimeoutMs: number;
  /** Receives exceptions thrown by listeners. */
  onListenerError: (err: unknown) => void;
}

/** setTimeout's largest delay; longer ones fire immediately. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

interface Waiter<E> {
  name: string;
  test: (ev: E) => unknown;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

export class EventHub<E extends QmpEvent = QmpEvent> {
  private readonly opts: EventHubOptions;
  private readonly backlogList: E[] = [];
  private readonly listeners = new Set<(ev: E) => void>();
  private readonly waiters = new Set<Waiter<E>>();
  private seq = 0;
  private closedWith: (() => Error) | undefined;

  constructor(opts: EventHubOptions) {
    this.opts = opts;
  }

  get lastSeq(): number {
    return this.seq;
  }

  recent(): E[] {
    return [...this.backlogList];
  }

  /** Numbers `ev`, keeps it, and hands it to waiters, then listeners. */
  publish(ev: Omit<E, 'seq'>): E {
    const full = { ...ev, seq: ++this.seq } as E;
    this.backlogList.push(full);
    if (this.backlogList.length > this.opts.backlog) this.backlogList.shift();
    for (const w of [...this.waiters]) {
      let hit: unknown;
      try {
        hit = w.test(full);
      } catch (err) {
        this.settle(w);
        w.reject(err instanceof Error ? err : new Error(String(err)));
        continue;
      }
      if (hit !== undefined) {
        this.settle(w);
        w.resolve(hit);
      }
    }
    // A throwing listener is the caller's bug, but it must not take the source (and a
    // migration steered through it) down, nor keep the event from the other listeners.
    for (const l of [...this.listeners]) {
      try {
        l(full);
      } catch (err) {
        this.opts.onListenerError(err);
      }
    }
    return full;
  }

  onEvent(listener: (ev: E) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Resolves with the first event `name` (typed and validated for known names) that satisfies
   * `predicate`. Only events after `since` count when it is given (the backlog is searched
   * first), else only events from now on. Rejects with QmpTimeoutError after `timeoutMs`
   * (Infinity: no limit), or with the close reason when the source ends.
   */
  waitFor<N extends string>(name: N, predicate?: (ev: EventFor<N> & E) => boolean, timeoutMs = this.opts.defaultTimeoutMs, options: WaitOptions = {}): Promise<EventFor<N> & E> {
    type R = EventFor<N> & E;
    const match = (ev: E): R | undefined => {
      if (ev.event !== name) return undefined;
      const typed = isKnownEventName(name) ? decodeEvent(ev, name) : ev;
      if (!typed) return undefined;
      const r = { ...ev, ...typed } as R;
      return !predicate || predicate(r) ? r : undefined;
    };
    return new Promise<R>((resolve, reject) => {
      try {
        if (options.since !== undefined) {
          for (const ev of this.backlogList) {
            if (ev.seq <= options.since) continue;
            const hit = match(ev);
            if (hit) return resolve(hit);
          }
        }
      } catch (err) {
        return reject(err);
      }
      if (this.closedWith) return reject(this.closedWith());
      const w: Waiter<E> = { name, test: match, resolve: resolve as (v: unknown) => void, reject, timer: undefined };
      if (timeoutMs !== Infinity) {
        w.timer = setTimeout(() => {
          this.waiters.delete(w);
          reject(new QmpTimeoutError(`waiting for event ${name}`, timeoutMs));
        }, Math.min(Math.max(timeoutMs, 0), MAX_TIMER_MS));
      }
      this.waiters.add(w);
    });
  }

  /** Ends the source: current and future waits reject with `reason(name)`. */
  close(reason: (what: string) => Error): void {
    this.closedWith = () => reason('waiting for an event');
    for (const w of this.waiters) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(reason(`waiting for ${w.name}`));
    }
    this.waiters.clear();
  }

  private settle(w: Waiter<E>): void {
    this.waiters.delete(w);
    if (w.timer) clearTimeout(w.timer);
  }
}
