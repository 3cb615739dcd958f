//! The process and its operating system: the descriptor limit and budget
//! ([`fdlimit`]), handing freed heap back ([`memtrim`]), binding listening
//! sockets with an explicit backlog ([`listener`]), the threads sessions run
//! on ([`workers`]) and the stop signal they watch ([`stop`]). Nothing here
//! knows PostgreSQL.

pub mod fdlimit;
pub mod listener;
pub mod memtrim;
pub mod stop;
pub mod workers;
